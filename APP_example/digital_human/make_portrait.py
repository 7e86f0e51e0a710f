"""Draws the shipped sample portrait (sample_portrait.png): a cartoon face placed where talking_head's centred box
expects one, so that the eyes blink and the mouth moves in the right places even though OpenCV's face cascade (made
for photographs) does not find a drawn face.

    python APP_example/digital_human/make_portrait.py          # writes sample_portrait.png beside this file
"""

from pathlib import Path

from PIL import Image, ImageDraw

from glm_tune.talking_head import centred_box

SIZE = 256
OUT = Path(__file__).with_name("sample_portrait.png")


def draw_portrait(size=SIZE):
    image = Image.new("RGB", (size, size), (198, 222, 240))
    draw = ImageDraw.Draw(image)
    face = centred_box(size, size, "drawn")
    left, top, right, bottom = face.x, face.y, face.x + face.w, face.y + face.h
    draw.rectangle((left + face.w * 0.3, bottom - 10, right - face.w * 0.3, size), fill=(232, 190, 160))  # neck
    draw.pieslice((left - 40, bottom + 10, right + 40, size + 120), 180, 360, fill=(60, 90, 150))  # shoulders
    draw.ellipse((left - 8, top - 18, right + 8, top + face.h * 0.6), fill=(70, 45, 30))  # hair
    draw.ellipse((left, top, right, bottom), fill=(240, 200, 170))  # face
    draw.chord((left - 4, top - 16, right + 4, top + face.h * 0.42), 180, 360, fill=(70, 45, 30))  # fringe
    eye_left, eye_right, (half_w, half_h) = face.eyes()
    for cx, cy in (eye_left, eye_right):
        draw.ellipse((cx - half_w, cy - half_h, cx + half_w, cy + half_h), fill=(255, 255, 255))
        draw.ellipse((cx - half_h, cy - half_h, cx + half_h, cy + half_h), fill=(50, 35, 25))
        draw.arc((cx - half_w, cy - 3 * half_h, cx + half_w, cy - half_h), 200, 340, fill=(70, 45, 30), width=2)
    (mx, my), mouth_half_w, _ = face.mouth()
    draw.line((left + face.w / 2, eye_left[1] + half_h * 2, left + face.w / 2 - 4, my - 14), fill=(200, 150, 130),
              width=2)  # nose
    draw.line((mx - mouth_half_w, my, mx + mouth_half_w, my), fill=(150, 55, 60), width=3)
    return image


if __name__ == "__main__":
    draw_portrait().save(OUT)
    print(OUT)
