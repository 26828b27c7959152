#!/usr/bin/env python3
"""Write the reference data for the Go tokenizer tests into testdata/tokenizer/.

Run with a Python that has the Hugging Face `tokenizers` library:

    /opt/torchenv/bin/python scripts/gen_tokenizer_testdata.py [--out testdata/tokenizer]

It trains small byte-level BPE tokenizers on a generated corpus and records
how the library encodes a few thousand varied strings:

  tokenizer.json      Llama-3 style: Sequence[Split(Llama-3 regex, Isolated),
                      ByteLevel(use_regex=False)], no normalizer, ignore_merges
                      (with some merges moved to the front so that it
                      matters), merges as [a, b] pairs, DiMOO's special tokens, a BOS
                      added by TemplateProcessing, ByteLevel decoder.
  gpt2-style.json     GPT-2 style: NFC normalizer, ByteLevel(use_regex=True),
                      merges as "a b" strings, normalized and single_word
                      added tokens, ByteLevel post-processor and decoder.
  gpt2-prefix.json    gpt2-style.json plus add_prefix_space, an lstrip special
                      token, an rstrip single_word token, an EOS appended by
                      TemplateProcessing and truncation to 64 ids.
  cases.jsonl, gpt2-cases.jsonl, gpt2-prefix-cases.jsonl
                      one {"text", "ids"} object per line; "norm" holds the
                      normalized text where it differs from "text", "skip"
                      the decoding with special tokens skipped where it
                      differs from the (normalized) text, and "decoded" the
                      plain decoding where a round trip is not exact.

Everything is deterministic: the corpus and the cases come from seeded
generators, and training runs single-threaded.
"""

import argparse
import json
import os
import random
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")

from tokenizers import (  # noqa: E402
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Lumina-DiMOO's special token strings, and a few more for the matching rules
# (one a prefix of another, a token made of two others).
SPECIALS = [
    BOS,
    EOS,
    "<|mdm_mask|>",
    "<system>",
    "</system>",
    "<user>",
    "</user>",
    "<uncondition>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_answer|>",
    "<|end_of_answer|>",
    "<|newline|>",
    "<|image_token_0|>",
    "<img>",
    "<img><img>",
]

# Plain added tokens of the Llama-style tokenizer: matched after the special
# ones (normalized=True), or with them (normalized=False).
LLAMA_ADDED = [
    AddedToken("<think>", special=False, normalized=True),
    AddedToken("</think>", special=False, normalized=True),
    AddedToken("<user", special=False, normalized=True),
    AddedToken("hello", special=False, normalized=True),
    AddedToken("@@dimoo@@", special=False, normalized=False),
]

# Plain added tokens of the GPT-2 style tokenizer (NFC normalizer).
GPT2_ADDED = [
    AddedToken("caf\u00e9", special=False, normalized=True),
    AddedToken("dimoo", special=False, normalized=True, single_word=True),
    AddedToken("<think>", special=False, normalized=True),
]

# ---------------------------------------------------------------------------
# Word material (written for this script).

ENGLISH = """
the of and to in is it you that he was for on are with as his they be at one have this from
or had by hot word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my over
know water than call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food sun
four between state keep eye never last let thought city tree cross farm hard start might story saw
far sea draw left late run while press close night real life few north open seem together next
white children begin got walk example ease paper group always music those both mark often letter
until mile river car feet care second book carry took science eat room friend began idea fish
mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual
young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best hour better
true during hundred five remember step early hold west ground interest reach fast verb sing listen
six table travel less morning ten simple several vowel toward war lay against pattern slow center
love person money serve appear road map rain rule govern pull cold notice voice unit power town
fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct
able pound done beauty drive stood contain front teach week final gave green oh quick develop ocean
warm free minute strong special mind behind clear tail produce fact street inch multiply nothing
course stay wheel full force blue object decide surface deep moon island foot system busy test
record boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape
equate miss brought heat snow tire bring yes distant fill east paint language among image model
token mask diffusion prompt generate render pixel caption hello goodbye tokenizer encode decode
""".split()

CONTRACTIONS = [
    "don't", "it's", "we're", "they've", "I'm", "you'll", "he'd", "can't", "won't", "isn't",
    "she's", "that's", "there's", "we'll", "they'd", "you've", "I'd", "let's", "y'all", "o'clock",
]

FOREIGN = {
    "fr": "café déjà élève garçon naïve où très être hôtel noël français œuvre crème brûlée".split(),
    "de": "Straße Mädchen Größe über schön Grüße Fußball Bäume Köln Übung".split(),
    "es": "niño año señor mañana corazón canción pingüino ¿qué? ¡hola! acción".split(),
    "pl": "źdźbło zażółć gęślą jaźń łódź żółw".split(),
    "tr": "İstanbul ığdır şeker Çağrı Ağaç".split(),
    "vi": "Tiếng Việt cảm ơn người Hà Nội phở".split(),
    "el": "καλημέρα κόσμος λόγος φίλος Ελλάδα θάλασσα".split(),
    "ru": "привет мир спасибо хорошо книга Москва ЁЖИК".split(),
    "zh": "你好 世界 中文 模型 图像 生成 扩散 语言 我们 今天".split(),
    "ja": "こんにちは ありがとう カタカナ 日本語 東京 ひらがな".split(),
    "ko": "안녕하세요 감사합니다 한국어 서울 사랑".split(),
    "ar": "مرحبا شكرا كتاب العربية سلام".split(),
    "he": "שלום תודה עברית ספר".split(),
    "hi": "नमस्ते धन्यवाद भाषा हिन्दी किताब".split(),
    "th": "สวัสดี ขอบคุณ ภาษาไทย".split(),
    "ka": "გამარჯობა მადლობა".split(),
    "am": "ሰላም አመሰግናለሁ".split(),
}
FOREIGN_WORDS = [w for ws in FOREIGN.values() for w in ws]

EMOJI = [
    "😀", "🎉", "👍", "👍🏽", "👍🏿", "👩\u200d💻", "👨\u200d👩\u200d👧\u200d👦", "🏳\ufe0f\u200d🌈",
    "🇫🇷", "🇯🇵", "❤\ufe0f", "✨", "🚀", "🤖", "🧑🏿\u200d🚀", "1\ufe0f\u20e3", "🙂", "🔥", "⭐", "☕",
]

PUNCT = list(".,;:!?-–—()[]{}<>\"'`~@#$%^&*_+=|\\/…«»“”‘’·•")

SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", "\x0b", "\x0c", "\x85", "\xa0",
          "\u2028", "\u2029", "\u3000", "\u2009", "\u200b", " \n", "\n ", "\t\t", " \t "]

DIGITS_OTHER = ["٣", "٤٥", "५", "१२३", "５", "１２３４", "²", "³", "½", "Ⅻ", "⑦", "〇", "٠١٢"]

# Text whose NFC form differs (decomposed accents, Hangul jamo, singletons).
DECOMPOSED = ["cafe\u0301", "e\u0301", "A\u030a", "n\u0303", "\u1100\u1161\u11a8",
              "\u212b", "\u2126", "o\u0308\u0304", "\u0041\u0300", "ﬁ", "caf\u00e9"]

CODE = [
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "if err != nil {\n\treturn err\n}",
    "x = [1, 2, 3]  # list",
    "SELECT * FROM users WHERE id = 42;",
    "<div class=\"box\">hi</div>",
    "https://example.com/path?q=1&r=two#frag",
    "user.name+tag@example.org",
    "C:\\Users\\me\\file.txt",
    "{\"key\": [true, false, null], \"n\": -1.5e-3}",
]


def number(rng):
    k = rng.randrange(8)
    if k == 0:
        return str(rng.randrange(10))
    if k == 1:
        return str(rng.randrange(10 ** rng.randrange(1, 20)))
    if k == 2:
        return f"{rng.randrange(1000000):,}"
    if k == 3:
        return f"{rng.uniform(-1000, 1000):.{rng.randrange(1, 6)}f}"
    if k == 4:
        return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if k == 5:
        return f"${rng.randrange(100000) / 100:.2f}"
    if k == 6:
        return f"{rng.randrange(101)}%"
    return "0" * rng.randrange(1, 6) + str(rng.randrange(1000))


def sentence(rng):
    words = []
    for _ in range(rng.randrange(3, 16)):
        r = rng.random()
        if r < 0.70:
            w = rng.choice(ENGLISH)
        elif r < 0.78:
            w = rng.choice(CONTRACTIONS)
        elif r < 0.86:
            w = number(rng)
        elif r < 0.95:
            w = rng.choice(FOREIGN_WORDS)
        else:
            w = rng.choice(EMOJI)
        words.append(w)
    if rng.random() < 0.3:
        i = rng.randrange(len(words))
        words[i] = rng.choice(["(", "\"", "'", "["]) + words[i] + rng.choice([")", "\"", "'", "]"])
    if rng.random() < 0.4:
        i = rng.randrange(len(words))
        words[i] += rng.choice([",", ";", ":", " -", "..."])
    s = " ".join(words)
    s = s[0].upper() + s[1:]
    return s + rng.choice([".", ".", ".", "!", "?", "...", ""])


def corpus(rng, n_lines):
    lines = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.80:
            lines.append(" ".join(sentence(rng) for _ in range(rng.randrange(1, 4))))
        elif r < 0.88:
            lines.append(rng.choice(CODE))
        elif r < 0.96:
            lines.append(" ".join(rng.choice(FOREIGN[rng.choice(list(FOREIGN))]) for _ in range(rng.randrange(2, 9))))
        else:
            lines.append(" ".join(number(rng) for _ in range(rng.randrange(2, 9))))
    return lines


# ---------------------------------------------------------------------------
# Test strings.

def soup(rng, n, nfc=False):
    pools = [
        (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"), 20),
        (list("0123456789"), 8),
        (PUNCT, 10),
        (SPACES, 10),
        (["'s", "'S", "'t", "'T", "'re", "'RE", "'rE", "'ve", "'VE", "'m", "'M", "'ll", "'LL", "'lL",
          "'d", "'D", "'\u017f", "'x", "'", "''"], 6),
        (FOREIGN_WORDS, 6),
        ([c for w in FOREIGN_WORDS for c in w], 6),
        (EMOJI, 5),
        (DIGITS_OTHER, 3),
        (SPECIALS + ["<user", "user>", "<|mdm_mask", "<|", "|>", "<", ">"], 4),
        (["\u0301", "\u0308", "\u200d", "\ufe0f", "\U0001F3FD", "\u00ad", "\ufeff", "\ufffd",
          "\x00", "\x01", "\x1b", "\x7f", "\u0085", "ª", "µ", "ß", "\u0130", "\u0131",
          "\x1c", "\x1d", "\x1e", "\x1f", "\u180e", "\u2060", "\u205f", "\u1680", "\u202f", "\u2007",
          "\u0345", "\u0903", "\u16ee", "\u3007", "\U0001d7d8", "\U00010140"], 4),
    ]
    if nfc:
        pools.append((DECOMPOSED, 4))
    total = sum(w for _, w in pools)
    out = []
    for _ in range(n):
        x = rng.randrange(total)
        for items, w in pools:
            if x < w:
                out.append(rng.choice(items))
                break
            x -= w
    return "".join(out)


def special_mix(rng):
    parts = []
    for _ in range(rng.randrange(1, 8)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(SPECIALS))
        elif r < 0.45:
            parts.append(rng.choice(["<user", "</user", "<img", "<|mdm_mask|", "<think>", "</think>",
                                     "@@dimoo@@", "hello", "dimoo", "café", "<<", ">>"]))
        elif r < 0.75:
            parts.append(rng.choice(ENGLISH + FOREIGN_WORDS))
        elif r < 0.9:
            parts.append(rng.choice(SPACES))
        else:
            parts.append(number(rng))
    return "".join(parts)


def spaced(rng):
    words = [rng.choice(ENGLISH + FOREIGN_WORDS + PUNCT + EMOJI) for _ in range(rng.randrange(1, 8))]
    out = rng.choice(SPACES + [""]) * rng.randrange(3)
    for w in words:
        out += w + "".join(rng.choice(SPACES) for _ in range(rng.randrange(0, 4)))
    return out


def contraction_case(rng):
    base = rng.choice(["don", "can", "it", "we", "they", "I", "you", "she", "y", "rock", "o", "DON", "IT"])
    suf = rng.choice(["'t", "'T", "'s", "'S", "'re", "'Re", "'RE", "'ve", "'VE", "'m", "'M", "'ll",
                      "'Ll", "'LL", "'d", "'D", "'\u017f", "'sound", "'tis", "'rest", "'llama", "'dd"])
    s = base + suf
    if rng.random() < 0.3:
        s = s.upper()
    return rng.choice(["", " ", "  ", "\n"]) + s + rng.choice(["", " ", ".", "!", " ok"])


def numbers_case(rng):
    parts = []
    for _ in range(rng.randrange(1, 6)):
        r = rng.random()
        if r < 0.6:
            parts.append(number(rng))
        elif r < 0.8:
            parts.append(rng.choice(DIGITS_OTHER))
        else:
            parts.append(str(rng.randrange(10 ** 12)) + rng.choice(["px", "kg", "st", "th", ""]))
    return rng.choice([" ", "", ",", " + ", "\n"]).join(parts)


def long_case(rng, nfc):
    r = rng.randrange(6)
    n = rng.randrange(60, 400)
    if r == 0:
        return rng.choice(["a", "ab", "the", "!", "-", "=", "0", "9", "中", "😀", " ", "\n", "\t"]) * n
    if r == 1:
        return "".join(rng.choice(FOREIGN["zh"] + FOREIGN["ja"]) for _ in range(n // 4))
    if r == 2:
        return "".join(rng.choice(PUNCT) for _ in range(n))
    if r == 3:
        return str(rng.randrange(10 ** 200)) [: n]
    if r == 4:
        return " ".join(sentence(rng) for _ in range(rng.randrange(5, 20)))
    return soup(rng, n, nfc)


FIXED = [
    "", " ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n\n", " \n ", "a", "A", "'", "''", "'s", "'S",
    "'\u017f", "'ll", "'LL", "'Ll", "'lL", "'re", "'RE", "don't", "DON'T", "Don'T", "I'M", "WE'RE",
    "they'VE", "she'D", "you'LL", "it'S", "y'all", "'tis", "rock'n'roll",
    "hello", "hello world", " hello", "hello ", "  hello  ", "hello\nworld", "hello\r\nworld",
    "hello<user>world", "<user>hello</user>", "<user><user><user>", "<img><img><img>", "<img><img>",
    "<<user>>", "<user", "user>", "<|mdm_mask|><|mdm_mask|>", "<system>You are a helpful assistant.</system>",
    "<|begin_of_image|><|image_token_0|><|end_of_image|>", "<|begin_of_answer|>yes<|end_of_answer|>",
    "text<|newline|>more", "<uncondition>", BOS + "x", EOS, " <user> ", "\n<user>\n",
    "<think>why</think>", "<user <user>", "@@dimoo@@", "x@@dimoo@@y", "hellohello", "Hello hello HELLO",
    "dimoo", "dimoos", "xdimoo", "dimoo dimoo", "(dimoo)", "dimoo_x", "dimoo\u0301", "café", "cafe\u0301",
    "CAFÉ", "12", "123", "1234", "12345", "1234567890", "3.14159", "1,000,000", "٣٤٥", "１２３", "½²",
    "😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳\ufe0f\u200d🌈", "🇫🇷🇯🇵", "a😀b", " 😀 ", "e\u0301",
    "\u212b", "\u2126", "\u1100\u1161\u11a8", "\x00", "\x7f", "\u200b", "\ufeff", "\u2028", "\u3000a",
    "\xa0b", "\x85c", "  \n  hello", "!!!\n\nabc", "a  \n\n  b", " \r\n \r\n x", "...", " ...",
    "$$$ 100", "\t\tindented", "trailing   ", "   ", "a\u0308", "ﬁne", "İstanbul", "ß", "ΣΑΣ",
]


def cases(seed, nfc):
    rng = random.Random(seed)
    out = list(FIXED)
    gens = [
        (lambda: " ".join(sentence(rng) for _ in range(rng.randrange(1, 3))), 25),
        (lambda: soup(rng, rng.randrange(1, 40), nfc), 25),
        (lambda: special_mix(rng), 12),
        (lambda: spaced(rng), 10),
        (lambda: contraction_case(rng), 8),
        (lambda: numbers_case(rng), 8),
        (lambda: rng.choice(CODE), 3),
        (lambda: rng.choice([" ", "  ", "\n", "\t", ""]) + sentence(rng) + rng.choice([" ", "  ", "\n", "\t", ""]), 6),
        (lambda: long_case(rng, nfc), 1),
    ]
    total = sum(w for _, w in gens)
    while len(out) < 10200:
        x = rng.randrange(total)
        for g, w in gens:
            if x < w:
                s = g()
                break
            x -= w
        out.append(s)
    return out


# ---------------------------------------------------------------------------
# Tokenizers.

def train(lines, pre, normalizer, vocab_size):
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    return tok


def save(tok, path, patch=None, pretty=False):
    """Writes tok's JSON, edited by patch(dict), and loads it back: the cases
    are encoded by exactly what the file says."""
    d = json.loads(tok.to_str())
    if patch is not None:
        patch(d)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(d, f, ensure_ascii=False, indent=2 if pretty else None)
        f.write("\n")
    return Tokenizer.from_file(path)


def write_cases(path, tok, texts, expect_prefix, nfc, store_decoded):
    norm = normalizers.NFC() if nfc else None
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for text in texts:
            ids = tok.encode(text, add_special_tokens=True).ids
            rec = {"text": text, "ids": ids}
            normed = norm.normalize_str(text) if norm else text
            if normed != text:
                rec["norm"] = normed
            plain = tok.decode(ids, skip_special_tokens=False)
            if store_decoded or plain != expect_prefix + normed:
                # Not a round trip: the prefix space, stripped spaces, or an
                # added token with characters of the byte alphabet ("café"
                # decodes through the byte table to invalid UTF-8).
                rec["decoded"] = plain
            skip = tok.decode(ids, skip_special_tokens=True)
            if skip != normed:
                rec["skip"] = skip
            f.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "testdata", "tokenizer"))
    ap.add_argument("--seed", type=int, default=20250101)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    lines = corpus(random.Random(a.seed), 6000)

    # Llama-3 style.
    llama = train(
        lines,
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
        None,
        3000,
    )
    llama.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    llama.add_tokens(LLAMA_ADDED)
    llama.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, llama.token_to_id(BOS))]),
    ])

    def llama_patch(d):
        # ignore_merges (as in Llama-3) emits a word found in the vocab as
        # is. A trained vocab is what its merges produce, so for that to
        # matter some merges are moved to the front: BPE then reaches many
        # words differently, and only the vocab lookup gives their token.
        m = d["model"]["merges"]
        moved = list(range(200, len(m), 50))[::-1]
        d["model"]["merges"] = [m[i] for i in moved] + [x for i, x in enumerate(m) if i not in set(moved)]
        d["model"]["ignore_merges"] = True

    llama = save(llama, os.path.join(a.out, "tokenizer.json"), llama_patch, pretty=True)

    # GPT-2 style with NFC.
    gpt2 = train(
        lines,
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        normalizers.NFC(),
        2500,
    )
    gpt2.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    gpt2.add_tokens(GPT2_ADDED)
    gpt2.post_processor = processors.ByteLevel(trim_offsets=True)

    def gpt2_patch(d):
        d["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in d["model"]["merges"]]

    gpt2 = save(gpt2, os.path.join(a.out, "gpt2-style.json"), gpt2_patch)

    # GPT-2 style with a prefix space, strip options, EOS and truncation.
    prefix = Tokenizer.from_str(gpt2.to_str())
    prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    prefix.add_special_tokens([AddedToken("<mask>", special=True, normalized=False, lstrip=True)])
    prefix.add_tokens([AddedToken("[[x]]", special=False, normalized=False, rstrip=True, single_word=True)])
    prefix.post_processor = processors.TemplateProcessing(single=f"$A {EOS}",
                                                          special_tokens=[(EOS, prefix.token_to_id(EOS))])
    prefix.enable_truncation(max_length=64)
    prefix = save(prefix, os.path.join(a.out, "gpt2-prefix.json"))

    texts = cases(a.seed + 1, nfc=False)
    write_cases(os.path.join(a.out, "cases.jsonl"), llama, texts, BOS, False, False)
    texts = cases(a.seed + 2, nfc=True)
    write_cases(os.path.join(a.out, "gpt2-cases.jsonl"), gpt2, texts, "", True, False)
    rng = random.Random(a.seed + 3)
    ptexts = list(FIXED) + [" <mask> ", "a <mask>b", "a\t <mask>  b", "x [[x]]  y", "[[x]]y", "y[[x]]",
                            "[[x]] [[x]]", "<mask><mask>", " [[x]]\n\n<mask>"]
    while len(ptexts) < 1500:
        s = rng.choice(texts)
        if rng.random() < 0.3:
            s = s.replace(" ", rng.choice([" <mask> ", " [[x]] ", "<mask>", "[[x]]"]), 1)
        ptexts.append(s)
    write_cases(os.path.join(a.out, "gpt2-prefix-cases.jsonl"), prefix, ptexts, "", True, True)

    for name in sorted(os.listdir(a.out)):
        print(f"{name}: {os.path.getsize(os.path.join(a.out, name))} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
