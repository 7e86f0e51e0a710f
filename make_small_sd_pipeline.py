"""Write a small Stable Diffusion pipeline folder in the standard diffusers layout (random UNet and text encoder, a
hand-set autoencoding VAE, a BPE tokenizer learned from a word list), for tests, demos and benchmarks.

    python make_small_sd_pipeline.py --output_dir models/sd-small
    python make_small_sd_pipeline.py --output_dir models/sd-small-eps --prediction_type epsilon --resolution 64

The apps in APP_example/lora_sd (and any diffusers code) take the folder as --pretrained_model_name_or_path; they
build the default one the same way on first use and cache it in ~/.cache/glm-tune ($GLM_TUNE_CACHE). With real
weights, point them at a diffusers SD 1.x/2.x folder or a hub id instead. glm_tune/sd_checkpoint.py describes what is
in the folder and why.
"""

import argparse

from glm_tune.sd_checkpoint import PREDICTION_TYPES, SMALL_SD_SHAPE, write_sd_pipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to create (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--resolution", type=int, default=SMALL_SD_SHAPE["resolution"],
                        help="default image size, a multiple of 8 (default: %(default)s; the UNet works at half)")
    parser.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=SMALL_SD_SHAPE["prediction_type"],
                        help="what the UNet predicts: sample (the clean latent; learns fastest from random weights, "
                             "with a DDIMScheduler), epsilon (the noise, as SD 1.x, with a PNDMScheduler) or "
                             "v_prediction (as SD 2.x 768, DDIMScheduler) (default: %(default)s)")
    parser.add_argument("--text_hidden", type=int, default=SMALL_SD_SHAPE["text_hidden"],
                        help="CLIP text encoder width, also the UNet's cross-attention width (default: %(default)s)")
    parser.add_argument("--text_layers", type=int, default=SMALL_SD_SHAPE["text_layers"],
                        help="CLIP text encoder layers (default: %(default)s)")
    parser.add_argument("--unet_channels", type=int, nargs="+", default=list(SMALL_SD_SHAPE["unet_channels"]),
                        help="UNet block_out_channels, multiples of 8 (default: %(default)s)")
    parser.add_argument("--vae_channels", type=int, default=SMALL_SD_SHAPE["vae_channels"],
                        help="VAE channels, a multiple of 8 (default: %(default)s)")
    args = parser.parse_args()
    try:
        folder = write_sd_pipeline(args.output_dir, seed=args.seed, resolution=args.resolution,
                                   text_hidden=args.text_hidden, text_layers=args.text_layers,
                                   unet_channels=tuple(args.unet_channels), vae_channels=args.vae_channels,
                                   prediction_type=args.prediction_type)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
