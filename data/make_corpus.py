#!/usr/bin/env python3
"""Build data/sample/rust-book.txt from the HTML of "The Rust Programming Language".

The book ships with every Rust toolchain's documentation (rustup component rust-docs), under
<toolchain>/share/doc/rust/html/book/. This script keeps the prose (paragraphs, list items, block
quotes), drops code blocks, headings and navigation, and writes the pretraining input format:
one sentence per line, a blank line between documents. Each section (an <h2> and what follows it)
of each chapter is one document.

    python3 data/make_corpus.py [BOOK_HTML_DIR] > data/sample/rust-book.txt
"""
import glob
import html.parser
import os
import re
import sys

SENTENCE_END = re.compile(r'(?<=[.!?])["\')\]]?\s+(?=["(\[]?[A-Z0-9])')


class Prose(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth_main = 0
        self.skip = 0  # inside <pre>, <script>, <style>, headings, nav
        self.block = None  # text of the paragraph being read
        self.docs = [[]]

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.depth_main += 1
        if not self.depth_main:
            return
        if tag in ("pre", "script", "style", "nav", "h1", "h3", "h4", "table", "figure"):
            self.skip += 1
        elif tag == "h2":
            self.skip += 1
            self.flush()
            if self.docs[-1]:
                self.docs.append([])
        elif tag in ("p", "li", "blockquote", "dd") and not self.skip:
            self.flush()
            self.block = []

    def handle_endtag(self, tag):
        if tag == "main":
            self.flush()
            self.depth_main -= 1
        if not self.depth_main:
            return
        if tag in ("pre", "script", "style", "nav", "h1", "h2", "h3", "h4", "table", "figure"):
            self.skip = max(0, self.skip - 1)
        elif tag in ("p", "li", "blockquote", "dd"):
            self.flush()

    def handle_data(self, data):
        if self.depth_main and not self.skip and self.block is not None:
            self.block.append(data)

    def flush(self):
        if self.block is None:
            return
        text = " ".join("".join(self.block).split())
        self.block = None
        if len(text) < 20:
            return
        for s in SENTENCE_END.split(text):
            s = s.strip()
            if s:
                self.docs[-1].append(s)


def main():
    book = sys.argv[1] if len(sys.argv) > 1 else sorted(
        glob.glob(os.path.expanduser("~/.rustup/toolchains/*/share/doc/rust/html/book")))[0]
    files = sorted(glob.glob(os.path.join(book, "ch[0-9][0-9]-*.html")))
    files += sorted(glob.glob(os.path.join(book, "appendix-*.html")))
    out = []
    for f in files:
        p = Prose()
        with open(f, encoding="utf-8") as fh:
            p.feed(fh.read())
        out.extend(d for d in p.docs if len(d) >= 2)
    sys.stdout.write("\n\n".join("\n".join(d) for d in out) + "\n")


if __name__ == "__main__":
    main()
