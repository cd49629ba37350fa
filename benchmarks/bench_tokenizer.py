"""Benchmark and cross-check RWKV world tokenizers on a few MB of offline text.

Candidates:
  * reference  - ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` from the official
                 ``rwkv`` package (pure Python; defines the correct ids);
  * pyrwkv_tokenizer - the Rust package, called directly;
  * rwkvstate  - our ``rwkvstate.tokenizer.WorldTokenizer`` wrapper
                 (Rust encoder, own id->bytes decode table).

The corpus is built only from files present on this machine, so the run needs
no network (see ``build_corpus`` for every source and why it is there):
  * English prose: the ``pydoc_data.topics`` help texts shipped with CPython;
  * code: CPython standard-library ``.py`` sources;
  * CJK: CPython's codec test data ``Lib/test/cjkencodings/*-utf8.txt``;
  * many languages: translated messages (msgstr) of the gettext catalogs in
    ``/usr/share/locale`` (system dependent; skipped if absent);
  * stress text: seeded synthetic emoji / whitespace-run / CRLF text, and every
    valid-UTF-8 token of the world vocab concatenated in shuffled order.

Usage:  python benchmarks/bench_tokenizer.py [--out-dir docs/benchmarks]
"""

from __future__ import annotations

import argparse
import datetime
import gettext
import glob
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC_DIR = REPO_ROOT / "src"
if str(SRC_DIR) not in sys.path:
    sys.path.insert(0, str(SRC_DIR))

from rwkvstate.tokenizer import WorldTokenizer, default_world_vocab_path  # noqa: E402

MAX_DOCUMENT_BYTES = 32 * 1024
MAX_CODE_BYTES = 1_400_000
MAX_BYTES_PER_LANGUAGE = 90_000
NUM_REPEATS = 5
SEED = 20240611

# Languages picked to cover many scripts: Han (simplified/traditional), kana,
# Hangul, Cyrillic, Arabic, Hebrew, Devanagari, Bengali, Tamil, Thai,
# Georgian, Greek, Armenian, Ethiopic, Myanmar, Khmer, and Latin with
# diacritics.
LANGUAGES = (
    "zh_CN zh_TW ja ko ru uk ar fa he hi bn ta th ka el hy am my km "
    "vi tr de fr es pt_BR pl cs"
).split()


@dataclass
class Document:
    category: str
    name: str
    text: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass
class Category:
    source: str
    documents: list[Document] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Corpus


def split_into_documents(category: str, name: str, text: str) -> list[Document]:
    """Cut long texts at line ends into pieces of at most MAX_DOCUMENT_BYTES."""
    documents, lines, size = [], [], 0
    for line in text.splitlines(keepends=True):
        num_bytes = len(line.encode("utf-8"))
        if lines and size + num_bytes > MAX_DOCUMENT_BYTES:
            documents.append(Document(category, f"{name}#{len(documents)}", "".join(lines)))
            lines, size = [], 0
        lines.append(line)
        size += num_bytes
    if lines:
        documents.append(Document(category, f"{name}#{len(documents)}", "".join(lines)))
    return documents


def read_utf8(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def english_prose() -> Category:
    from pydoc_data import topics

    category = Category("CPython pydoc_data.topics (help() texts)")
    for key in sorted(topics.topics):
        category.documents += split_into_documents("english", f"topics:{key}", topics.topics[key])
    return category


def stdlib_code() -> Category:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    category = Category(f"CPython {platform.python_version()} stdlib Lib/*.py and Lib/*/*.py (sorted, capped)")
    total = 0
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "site-packages" in path.parts or path.parent.name == "test":
            continue
        text = read_utf8(str(path))
        if not text:
            continue
        name = str(path.relative_to(stdlib))
        category.documents += split_into_documents("code", name, text)
        total += len(text.encode("utf-8"))
        if total >= MAX_CODE_BYTES:
            break
    return category


def cjk_test_data() -> Category:
    pattern = os.path.join(sysconfig.get_paths()["stdlib"], "test", "cjkencodings", "*-utf8.txt")
    category = Category("CPython Lib/test/cjkencodings/*-utf8.txt")
    for path in sorted(glob.glob(pattern)):
        text = read_utf8(path)
        if text:
            category.documents += split_into_documents("cjk", os.path.basename(path), text)
    return category


def catalog_messages(path: str) -> list[str]:
    try:
        with open(path, "rb") as file:
            catalog = gettext.GNUTranslations(file)._catalog
    except Exception:  # noqa: BLE001 - broken/odd catalogs are just skipped
        return []
    # Key "" is the catalog header, not a translation.
    return [value for key, value in sorted(catalog.items(), key=str) if key != "" and value]


def translations(locale_dir: str = "/usr/share/locale") -> Category:
    category = Category(f"gettext catalogs {locale_dir}/<lang>/LC_MESSAGES/*.mo (msgstr only)")
    for language in LANGUAGES:
        messages, size = [], 0
        for path in sorted(glob.glob(f"{locale_dir}/{language}/LC_MESSAGES/*.mo")):
            for message in catalog_messages(path):
                if size >= MAX_BYTES_PER_LANGUAGE:
                    break
                messages.append(message)
                size += len(message.encode("utf-8")) + 1
        text = "\n".join(messages)
        category.documents += split_into_documents("translations", f"locale:{language}", text)
    return category


def random_emoji(rng: random.Random) -> str:
    base = chr(rng.choice([rng.randint(0x1F300, 0x1F5FF), rng.randint(0x1F600, 0x1F64F),
                           rng.randint(0x1F900, 0x1F9FF), rng.randint(0x2600, 0x26FF)]))
    roll = rng.random()
    if roll < 0.2:
        return base + chr(rng.randint(0x1F3FB, 0x1F3FF))  # skin tone
    if roll < 0.35:
        return base + "\u200d" + random_emoji(rng)  # ZWJ sequence
    if roll < 0.45:
        return chr(rng.randint(0x1F1E6, 0x1F1FF)) + chr(rng.randint(0x1F1E6, 0x1F1FF))  # flag
    if roll < 0.55:
        return base + "\ufe0f"
    return base


WHITESPACE_PIECES = [" ", "  ", "\t", "\n", "\r\n", "\u3000", "\u00a0", "\n\n", "    ", "\r\n\r\n"]


def synthetic_stress(english_text: str) -> Category:
    """Emoji, whitespace runs and CRLF line ends, from a fixed seed."""
    rng = random.Random(SEED)
    words = english_text.split()[:20000]
    category = Category(f"seeded synthetic text (random.Random({SEED})): emoji, whitespace runs, CRLF")
    emoji = " ".join("".join(random_emoji(rng) for _ in range(rng.randint(1, 4))) for _ in range(12000))
    runs = "".join(
        rng.choice(words) + "".join(rng.choice(WHITESPACE_PIECES) for _ in range(rng.randint(1, 40)))
        for _ in range(8000)
    )
    crlf = english_text[:120_000].replace("\n", "\r\n")
    for name, text in (("emoji", emoji), ("whitespace", runs), ("crlf", crlf)):
        category.documents += split_into_documents("synthetic", name, text)
    return category


def vocab_tokens_text(tokenizer: WorldTokenizer) -> Category:
    """Every token that is valid UTF-8 by itself, in seeded random order."""
    tokens = []
    for value in tokenizer.id_to_bytes[1:]:
        try:
            tokens.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    random.Random(SEED).shuffle(tokens)
    category = Category(f"all valid-UTF-8 world vocab tokens, shuffled (random.Random({SEED}))")
    text = "".join(tokens)
    # Fixed-size cuts (not line cuts): the vocab text has few newlines.
    for start in range(0, len(text), 8192):
        category.documents.append(Document("vocab", f"vocab#{start // 8192}", text[start:start + 8192]))
    return category


def build_corpus(tokenizer: WorldTokenizer) -> dict[str, Category]:
    english = english_prose()
    english_text = "".join(doc.text for doc in english.documents)
    categories = {
        "english": english,
        "code": stdlib_code(),
        "cjk": cjk_test_data(),
        "translations": translations(),
        "synthetic": synthetic_stress(english_text),
        "vocab": vocab_tokens_text(tokenizer),
    }
    return {name: cat for name, cat in categories.items() if cat.documents}


# ---------------------------------------------------------------------------
# Candidates

LOAD_SNIPPETS = {
    "reference": (
        "import os, rwkv; from rwkv.rwkv_tokenizer import TRIE_TOKENIZER; "
        "path = os.path.join(os.path.dirname(rwkv.__file__), 'rwkv_vocab_v20230424.txt'); "
        "t = time.perf_counter(); TRIE_TOKENIZER(path)"
    ),
    "pyrwkv_tokenizer": (
        "import pyrwkv_tokenizer; from rwkvstate.tokenizer import default_world_vocab_path; "
        "path = default_world_vocab_path(); "
        "t = time.perf_counter(); pyrwkv_tokenizer.WorldTokenizer(path)"
    ),
    # Ours loads lazily, so force both tables (encoder + decode table).
    "rwkvstate": (
        "from rwkvstate.tokenizer import WorldTokenizer; "
        "t = time.perf_counter(); tok = WorldTokenizer(); tok.encode('x'); tok.decode([1])"
    ),
}


def measure_load_s(candidate: str, num_runs: int = NUM_REPEATS) -> float:
    """Median construction time in fresh interpreters (no warm caches)."""
    code = f"import time; {LOAD_SNIPPETS[candidate]}; print(time.perf_counter() - t)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")]))
    times = []
    for _ in range(num_runs):
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True).stdout
        times.append(float(out.strip().splitlines()[-1]))
    return statistics.median(times)


def make_candidates():
    """name -> (encode_all, decode_one); instances are built outside timing."""
    import pyrwkv_tokenizer
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    reference = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    rust = pyrwkv_tokenizer.WorldTokenizer(default_world_vocab_path())
    ours = WorldTokenizer()
    ours.encode("x"), ours.decode([1])
    return reference, {
        "reference": (lambda texts: [reference.encode(t) for t in texts], reference.decode),
        "pyrwkv_tokenizer": (lambda texts: [rust.encode(t) for t in texts], rust.decode),
        "pyrwkv_tokenizer (encode_batch)": (rust.encode_batch, rust.decode),
        "rwkvstate": (lambda texts: [ours.encode(t) for t in texts], ours.decode),
        "rwkvstate (encode_batch)": (ours.encode_batch, ours.decode),
    }


@dataclass
class Timing:
    """Best wall and CPU seconds over repeats; CPU time is less disturbed by
    other processes on a shared machine."""

    wall_s: float = float("inf")
    cpu_s: float = float("inf")

    def run(self, function, argument):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function(argument)
        self.wall_s = min(self.wall_s, time.perf_counter() - wall)
        self.cpu_s = min(self.cpu_s, time.process_time() - cpu)
        return result


def time_candidates(candidates, texts, num_repeats):
    """Round-robin over candidates each repeat, so a burst of load from other
    processes hits them all rather than whichever ran at that moment."""
    timings = {name: (Timing(), Timing()) for name in candidates}
    outputs = {}
    for repeat in range(num_repeats):
        for name, (encode_all, decode_one) in candidates.items():
            if name == "reference" and repeat > 0:
                continue  # pure Python and ~15x slower: one run is enough
            encode_timing, decode_timing = timings[name]
            ids = encode_timing.run(encode_all, texts)
            decoded = decode_timing.run(lambda all_ids: [decode_one(x) for x in all_ids], ids)
            outputs[name] = (ids, decoded)
    return timings, outputs


def first_mismatch(documents, reference_ids, candidate_ids, id_to_bytes):
    for doc, ref, got in zip(documents, reference_ids, candidate_ids):
        if ref == got:
            continue
        index = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        byte_offset = sum(len(id_to_bytes[i]) for i in ref[:index])
        raw = doc.text.encode("utf-8")
        return {
            "document": doc.name,
            "token_index": index,
            "byte_offset": byte_offset,
            "text_at_mismatch": repr(raw[max(0, byte_offset - 20):byte_offset + 40].decode("utf-8", "replace")),
            "reference_ids": ref[max(0, index - 2):index + 6],
            "candidate_ids": got[max(0, index - 2):index + 6],
        }
    return None


def summarize_candidate(name, timings, outputs, documents, reference_ids, id_to_bytes):
    encode_timing, decode_timing = timings
    ids, decoded = outputs
    num_bytes = sum(doc.num_bytes for doc in documents)
    return {
        "name": name,
        "num_repeats": 1 if name == "reference" else NUM_REPEATS,
        "encode_s": encode_timing.wall_s,
        "encode_cpu_s": encode_timing.cpu_s,
        "encode_mb_s": num_bytes / encode_timing.wall_s / 1e6,
        "decode_s": decode_timing.wall_s,
        "decode_cpu_s": decode_timing.cpu_s,
        "decode_mb_s": num_bytes / decode_timing.wall_s / 1e6,
        "num_mismatched_documents": sum(a != b for a, b in zip(reference_ids, ids)),
        "first_mismatch": first_mismatch(documents, reference_ids, ids, id_to_bytes),
        "num_roundtrip_failures": sum(d != doc.text for d, doc in zip(decoded, documents)),
    }


def bench_stream_decoder(documents, all_ids):
    """Token-at-a-time decode, as in streaming generation."""
    from rwkvstate.tokenizer import StreamDecoder

    tokenizer = WorldTokenizer()

    def decode_streaming(all_ids):
        outputs = []
        for ids in all_ids:
            stream = StreamDecoder(tokenizer)
            outputs.append("".join(stream.push(i) for i in ids) + stream.flush())
        return outputs

    timing = Timing()
    outputs = timing.run(decode_streaming, all_ids)
    num_tokens = sum(len(ids) for ids in all_ids)
    return {
        "decode_s": timing.wall_s,
        "decode_cpu_s": timing.cpu_s,
        "tokens_per_s": num_tokens / timing.wall_s,
        "num_mismatches_vs_text": sum(o != d.text for o, d in zip(outputs, documents)),
    }


# ---------------------------------------------------------------------------
# Report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def corpus_summary(categories, reference_ids_by_doc):
    summary = {}
    for name, category in categories.items():
        num_bytes = sum(doc.num_bytes for doc in category.documents)
        num_tokens = sum(len(reference_ids_by_doc[id(doc)]) for doc in category.documents)
        summary[name] = {
            "source": category.source,
            "num_documents": len(category.documents),
            "num_bytes": num_bytes,
            "num_tokens": num_tokens,
            "bytes_per_token": round(num_bytes / max(num_tokens, 1), 3),
        }
    return summary


def write_markdown(report: dict, path: Path) -> None:
    corpus = report["corpus"]
    lines = [
        "# Tokenizer benchmark (RWKV world vocab)",
        "",
        f"- date: {report['date']}",
        f"- CPU: {report['machine']['cpu_model']} ({report['machine']['num_cpus']} logical CPUs), "
        f"Python {report['machine']['python']}; load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.2f}' for x in report['machine']['load_average_at_start'])}",
        f"- packages: " + ", ".join(f"{k} {v}" for k, v in report["packages"].items()),
        f"- corpus: {corpus['num_bytes'] / 1e6:.2f} MB UTF-8, {corpus['num_chars']:,} chars, "
        f"{corpus['num_documents']} documents (<= {MAX_DOCUMENT_BYTES // 1024} KiB each), "
        f"{corpus['num_tokens']:,} tokens",
        f"- timings: wall and CPU time, each the best of {NUM_REPEATS} round-robin runs over all {corpus['num_documents']} "
        f"documents (reference: 1 run); MB/s from wall time; load = median of {NUM_REPEATS} fresh interpreters",
        "",
        "| candidate | load (s) | encode (s) | encode CPU (s) | encode MB/s | decode (s) | decode CPU (s) | decode MB/s | docs with ids != reference | round-trip failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["candidates"]:
        load = f"{c['load_s']:.3f}" if c.get("load_s") is not None else "(same)"
        lines.append(
            f"| {c['name']} | {load} | {c['encode_s']:.3f} | {c['encode_cpu_s']:.3f} | {c['encode_mb_s']:.2f} | "
            f"{c['decode_s']:.3f} | {c['decode_cpu_s']:.3f} | {c['decode_mb_s']:.2f} | {c['num_mismatched_documents']} | "
            f"{c['num_roundtrip_failures']} |"
        )
    stream = report["stream_decoder"]
    lines += [
        "",
        f"StreamDecoder (rwkvstate, one `push` per token): {stream['decode_s']:.3f} s "
        f"({stream['decode_cpu_s']:.3f} s CPU), "
        f"{stream['tokens_per_s'] / 1e6:.2f} M tokens/s, mismatches vs text: {stream['num_mismatches_vs_text']}",
        "",
        "| corpus part | documents | MB | tokens | bytes/token | source |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, part in corpus["categories"].items():
        lines.append(
            f"| {name} | {part['num_documents']} | {part['num_bytes'] / 1e6:.3f} | {part['num_tokens']:,} | "
            f"{part['bytes_per_token']} | {part['source']} |"
        )
    mismatches = [c for c in report["candidates"] if c["first_mismatch"]]
    lines += ["", "First mismatches:" if mismatches else "All candidates produced ids identical to the reference."]
    for c in mismatches:
        lines.append(f"- {c['name']}: `{json.dumps(c['first_mismatch'], ensure_ascii=False)}`")
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs" / "benchmarks")
    args = parser.parse_args()

    load_average_at_start = list(os.getloadavg())
    ours = WorldTokenizer()
    categories = build_corpus(ours)
    documents = [doc for cat in categories.values() for doc in cat.documents]
    num_bytes = sum(doc.num_bytes for doc in documents)
    print(f"corpus: {num_bytes / 1e6:.2f} MB in {len(documents)} documents", flush=True)

    _, candidates = make_candidates()
    timings, outputs = time_candidates(candidates, [doc.text for doc in documents], NUM_REPEATS)
    reference_ids = outputs["reference"][0]
    results = []
    for name in candidates:
        result = summarize_candidate(name, timings[name], outputs[name], documents, reference_ids,
                                     ours.id_to_bytes)
        # encode_batch rows share the constructor of the row above them.
        result["load_s"] = measure_load_s(name) if name in LOAD_SNIPPETS else None
        results.append(result)
        print(json.dumps(result, ensure_ascii=False), flush=True)

    reference_ids_by_doc = {id(doc): ids for doc, ids in zip(documents, reference_ids)}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            # Other work on the machine skews timings; keep the evidence.
            "load_average_at_start": load_average_at_start,
            "load_average_at_end": list(os.getloadavg()),
            "num_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "packages": {name: package_version(name) for name in ("rwkv", "pyrwkv-tokenizer")},
        "corpus": {
            "num_bytes": num_bytes,
            "num_chars": sum(len(doc.text) for doc in documents),
            "num_documents": len(documents),
            "num_tokens": sum(len(ids) for ids in reference_ids),
            "max_document_bytes": MAX_DOCUMENT_BYTES,
            "categories": corpus_summary(categories, reference_ids_by_doc),
        },
        "candidates": results,
        "stream_decoder": bench_stream_decoder(documents, reference_ids),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "tokenizer.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    write_markdown(report, args.out_dir / "tokenizer.md")
    print(f"wrote {args.out_dir / 'tokenizer.json'} and {args.out_dir / 'tokenizer.md'}")


if __name__ == "__main__":
    main()
