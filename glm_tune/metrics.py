"""Text-generation metrics, computed the way THUDM's ChatGLM-6B P-Tuning evaluation (ptuning/main.py,
compute_metrics) computes them, plus what that one leaves out; for evaluate.py and for finetune.py's
--predict_with_generate evaluation during training.

Per row (prediction = generated answer, reference = the expected one), each x 100 and rounded to 4 decimals as the
official code does, then averaged over rows:

    rouge-1, rouge-2, rouge-l   rouge_chinese's F-scores over jieba tokens (jieba splits Chinese into words and English
                                at spaces and punctuation, so mixed text works); as in rouge_chinese, ROUGE-N counts
                                each distinct n-gram once
    bleu-4                      BLEU-4 (NLTK sentence_bleu, smoothing method3) over the same jieba tokens
    bleu-4-char                 the official figure: the same BLEU-4 over characters (list(text)), comparable with
                                numbers reported by the official scripts; short answers score low on it (a correct
                                2-character answer gets 59.46: it has no 3- or 4-grams)
    exact_match                 100 when the prediction equals the reference, both stripped (inference.py's rule)
    gen_len_chars, gen_len_tokens   the prediction's length in characters, and in generated tokens (the end token
                                included, as transformers' gen_len counts them)

An empty prediction or reference scores 0 on BLEU and ROUGE (the official code would crash on it).
"""

import logging

import numpy as np
import torch
from transformers import Trainer

METRICS = ("bleu-4", "bleu-4-char", "rouge-1", "rouge-2", "rouge-l", "exact_match", "gen_len_chars")
METRICS_HELP = ("BLEU-4 and ROUGE-1/2/L F as THUDM's ChatGLM-6B P-Tuning evaluation computes them (jieba words, "
                "rouge_chinese, NLTK sentence_bleu with smoothing method3, x100, mean over rows), except that bleu-4 "
                "is over the same jieba words as ROUGE; bleu-4-char is the official character-level BLEU-4")


def exact_match(prediction, reference):
    """inference.py's accuracy rule: the answer equals the expected text, surrounding whitespace aside."""
    return prediction.strip() == reference.strip()


def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict ..." chatter on stderr
    return jieba


def words(text):
    """jieba's tokens of `text`, whitespace dropped: Chinese words, and English words and punctuation marks."""
    return [token for token in _jieba().cut(text) if token.strip()]


def bleu4(hypothesis, reference):
    """NLTK's sentence BLEU-4 with smoothing method3 of two token lists, in [0, 1]; 0 when either is empty."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not hypothesis or not reference:
        return 0.0
    return float(sentence_bleu([list(reference)], list(hypothesis),
                               smoothing_function=SmoothingFunction().method3))


def rouge_f(hypothesis, reference):
    """{"rouge-1", "rouge-2", "rouge-l"}: rouge_chinese's F-scores of two token lists, in [0, 1]; 0 when either is
    empty (rouge_chinese raises there)."""
    from rouge_chinese import Rouge

    if not hypothesis or not reference:
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    scores = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    return {name: float(value["f"]) for name, value in scores.items()}


def row_scores(prediction, reference):
    """One row's scores (see the module docstring): every name of METRICS, x 100 where the official code scales."""
    hypothesis, expected = words(prediction), words(reference)
    scores = {name: round(value * 100, 4) for name, value in rouge_f(hypothesis, expected).items()}
    scores["bleu-4"] = round(bleu4(hypothesis, expected) * 100, 4)
    scores["bleu-4-char"] = round(bleu4(list(prediction), list(reference)) * 100, 4)
    scores["exact_match"] = 100.0 if exact_match(prediction, reference) else 0.0
    scores["gen_len_chars"] = len(prediction)
    return {name: scores[name] for name in METRICS}


def mean_scores(rows, token_lengths=None):
    """Means over rows of row_scores() dicts (their order: the same rows in the same order give the same floats);
    gen_len_tokens too when `token_lengths` (generated tokens per row) is given."""
    if not rows:
        raise ValueError("no rows to score")
    means = {name: float(np.mean([row[name] for row in rows])) for name in METRICS}
    if token_lengths is not None:
        means["gen_len_tokens"] = float(np.mean(token_lengths))
    return means


def score(predictions, references, token_lengths=None):
    """The mean scores of `predictions` against `references` (lists of strings, in pairs): a dict over METRICS, plus
    gen_len_tokens when `token_lengths` is given."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return mean_scores([row_scores(p, r) for p, r in zip(predictions, references)], token_lengths)


# ----------------------------------------------------------------------------------------------------------------------
# Generation-based evaluation during training (finetune.py --predict_with_generate)

IGNORE = -100  # label of prompt and padding positions, and padding of generated rows across batches


def prompts_of_batch(batch):
    """The prompt ids of every row of a PrefixLMCollator batch: the tokens before its first label, i.e. the prompt up
    to and including [gMASK] <sop> (a row whose answer was cut away entirely: all its tokens)."""
    prompts = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        answer = (labels != IGNORE).nonzero()
        end = int(answer[0]) if len(answer) else int(mask.sum())
        prompts.append(ids[:end].tolist())
    return prompts


def left_pad(prompts, pad_token_id, device=None):
    """{"input_ids", "attention_mask"} of id lists padded on the left, as the tokenizer pads a generation batch."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if prompt:
            input_ids[i, length - len(prompt):] = torch.tensor(prompt)
            attention_mask[i, length - len(prompt):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


class GenerationMetrics:
    """A Trainer compute_metrics: EvalPrediction(predictions = generated answer ids padded with -100, label_ids =
    labels) -> the mean scores of the decoded answers against the decoded labels (see `score`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, eval_prediction):
        """(predictions, references, generated token counts), as evaluate.py would see them."""
        from glm_tune.generation import decode_answer

        predictions, references, lengths = [], [], []
        for generated, labels in zip(eval_prediction.predictions, eval_prediction.label_ids):
            generated = [int(t) for t in generated if t != IGNORE]
            predictions.append(decode_answer(self.tokenizer, generated))
            lengths.append(len(generated))
            references.append(self.tokenizer.decode([int(t) for t in labels if t != IGNORE],
                                                    skip_special_tokens=True).strip())
        return predictions, references, lengths

    def __call__(self, eval_prediction):
        predictions, references, lengths = self.decode(eval_prediction)
        return score(predictions, references, lengths)


class GenerationEvalMixin:
    """For a transformers Trainer class: with TrainingArguments.predict_with_generate, each evaluation also generates
    an answer for every eval row (greedy, at most generation_max_length new tokens, from the row's prompt: its tokens
    up to and including <sop>) and adds the scores of `score` to the eval metrics: eval_bleu-4, eval_rouge-1, ... next
    to eval_loss, in the log and in trainer_state.json's log_history. Without the flag the Trainer is unchanged.

    `tokenizer` decodes the answers (default: the data collator's); it is not handed to the Trainer, which would save
    it into every checkpoint."""

    def __init__(self, *args, tokenizer=None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        self.generate_during_eval = bool(getattr(training_args, "predict_with_generate", False))
        tokenizer = tokenizer or getattr(kwargs.get("data_collator"), "tokenizer", None)
        if self.generate_during_eval:
            if tokenizer is None:
                raise ValueError("predict_with_generate needs the tokenizer")
            if kwargs.get("compute_metrics") is None:
                kwargs["compute_metrics"] = GenerationMetrics(tokenizer)
        self.generation_tokenizer = tokenizer
        super().__init__(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self.generate_during_eval or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        loss, _, _ = super().prediction_step(model, inputs, True, ignore_keys=ignore_keys)  # eval_loss as before
        generated = self.generate_answers(model, inputs)
        return loss, generated, inputs["labels"]

    def generate_answers(self, model, inputs):
        """Greedy answer ids of every row of an eval batch, [rows, longest], padded with -100."""
        from glm_tune.generation import generate_new_tokens, input_device

        model = self.accelerator.unwrap_model(model)
        prompts = prompts_of_batch(inputs)
        batch = left_pad(prompts, self.generation_tokenizer.pad_token_id, input_device(model))
        max_new_tokens = getattr(self.args, "generation_max_length", None) or 128
        rows = generate_new_tokens(model, batch, max_new_tokens, do_sample=False, use_cache=True)
        out = torch.full((len(rows), max(1, max(len(r) for r in rows))), IGNORE, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out.to(inputs["labels"].device)


class GenerationEvalTrainer(GenerationEvalMixin, Trainer):
    """transformers' Trainer with GenerationEvalMixin."""


def with_generation_eval(trainer_class=Trainer):
    """`trainer_class` (a Trainer subclass) with GenerationEvalMixin."""
    if issubclass(trainer_class, GenerationEvalMixin):
        return trainer_class
    if trainer_class is Trainer:
        return GenerationEvalTrainer
    return type(f"GenerationEval{trainer_class.__name__}", (GenerationEvalMixin, trainer_class), {})
