"""Write the sample knowledge base's two binary documents, sample_kb/hr/expense_policy.docx and
sample_kb/clubs/astronomy_club.pdf, from the text below.

They are committed; this script is how they were made (and how to change them), with nothing but the standard
library: a .docx is a zip of a few XML parts, and a PDF of plain ASCII text in a standard font needs no embedded font,
only objects at byte offsets the cross-reference table lists. The output is the same bytes on every run (fixed zip
timestamps), so rebuilding an index after running it again re-embeds nothing.

    python APP_example/chat_langchain/make_sample_binaries.py
"""

import zipfile
from pathlib import Path
from textwrap import wrap
from xml.sax.saxutils import escape

SAMPLE_KB = Path(__file__).resolve().parent / "sample_kb"

EXPENSE_POLICY = [
    "星河科技有限公司差旅费用报销制度",
    "第一条 本制度适用于因公出差的全体员工。出差前须在飞鸽 OA 系统提交出差申请，经直属主管批准后方可预订交通和住宿。",
    "第二条 住宿标准：北京、上海、广州、深圳每人每晚不超过 600 元，其他城市每人每晚不超过 400 元。"
    "两名同性别员工同行的，原则上合住一间标准间。",
    "第三条 交通标准：火车优先乘坐高铁二等座；单程超过 6 小时的可以乘坐飞机经济舱。"
    "市内出租车或网约车须提供电子行程单，深夜 22 点以后的打车费用全额报销。",
    "第四条 伙食补助：出差期间每人每天补助 100 元，按自然日计算，无需提供餐饮发票。",
    "第五条 报销时限：出差结束后 30 天内须在飞鸽 OA 提交报销单，并附增值税发票，发票抬头须为“星河科技有限公司”并填写税号。"
    "逾期提交的，财务部不予受理。",
    "第六条 超出标准的费用须由分管副总裁书面审批，否则超出部分由员工个人承担。",
]

ASTRONOMY_PAGES = [
    [
        "Orion Amateur Astronomy Club - Members' Handbook",
        "",
        "Meetings. The club meets on the first Friday of every month at 7:30 pm in Room 204 of the Maplewood Public "
        "Library. Each meeting opens with a twenty-minute talk by a member, followed by the sky-of-the-month "
        "briefing.",
        "",
        "Observing nights. Observing nights are held at the Pine Ridge dark-sky site on the Saturday nearest to the "
        "new moon, from sunset until 1 am. If the cloud cover forecast is above 60 percent at noon, the night is "
        "cancelled and members are told by text message.",
        "",
        "Membership. The yearly membership fee is 40 dollars; students pay 15 dollars. Membership includes the club "
        "newsletter, The Eyepiece, and insurance for observing nights.",
    ],
    [
        "Telescope loans. Members may borrow the club's 8-inch Dobsonian telescope or one of the two 70 mm "
        "refractors for two weeks at a time. Book a telescope with the club secretary at least three days ahead and "
        "return it clean, with all lens caps on.",
        "",
        "Light discipline. At the Pine Ridge site use red flashlights only. White lights, phone screens without a "
        "red filter and car headlights ruin everyone's dark adaptation, which takes about thirty minutes to "
        "recover. Park facing away from the observing field and switch headlights off before entering it.",
        "",
        "Safety. Never point a telescope at the Sun without a certified solar filter over the front of the tube.",
    ],
]


def write_docx(path, paragraphs):
    """A minimal Word document: the content types, the package relationship and the body, one w:p per paragraph."""
    body = "".join(f'<w:p><w:r><w:t xml:space="preserve">{escape(p)}</w:t></w:r></w:p>' for p in paragraphs)
    parts = {
        "[Content_Types].xml":
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/word/document.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
            '</Types>',
        "_rels/.rels":
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" Target="word/document.xml" '
            'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument"/>'
            '</Relationships>',
        "word/document.xml":
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
            f"<w:body>{body}</w:body></w:document>",
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in parts.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), text.encode("utf-8"),
                             zipfile.ZIP_DEFLATED)


def pdf_text_stream(lines):
    """A page's content stream: Helvetica 11 pt, 14 pt leading, one Tj per line from the top-left margin."""
    def literal(line):
        return "(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"

    ops = ["BT", "/F1 11 Tf", "14 TL", "72 740 Td"]
    ops += [f"{literal(line)} Tj T*" for line in lines]
    return "\n".join(ops + ["ET"]).encode("ascii")


def write_pdf(path, pages, width=88):
    """A PDF with one page per entry of `pages` (paragraphs, wrapped at `width` characters; "" is a blank line)."""
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{' '.join(f'{i} 0 R' for i in page_ids)}] /Count {len(pages)} >>".encode(),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for page_id, paragraphs in zip(page_ids, pages):
        lines = [line for p in paragraphs for line in (wrap(p, width) or [""])]
        stream = pdf_text_stream(lines)
        objects[page_id] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R "
                            f">> >> /Contents {page_id + 1} 0 R >>").encode()
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    out, offsets = bytearray(b"%PDF-1.4\n"), {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in sorted(objects))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    Path(path).write_bytes(bytes(out))


def main():
    (SAMPLE_KB / "hr").mkdir(parents=True, exist_ok=True)
    (SAMPLE_KB / "clubs").mkdir(parents=True, exist_ok=True)
    write_docx(SAMPLE_KB / "hr" / "expense_policy.docx", EXPENSE_POLICY)
    write_pdf(SAMPLE_KB / "clubs" / "astronomy_club.pdf", ASTRONOMY_PAGES)
    print(f"wrote {SAMPLE_KB / 'hr' / 'expense_policy.docx'} and {SAMPLE_KB / 'clubs' / 'astronomy_club.pdf'}")


if __name__ == "__main__":
    main()
