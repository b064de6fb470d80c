"""Train the byte-level BPE tokenizer (vocab 8192) and pre-tokenize the corpus.

Usage: python -m training.tokenizer [--corpus runs/corpus] [--model-dir models/lynx-ref-moe]

* Trains on a deterministic sample (<= --sample-mb MB) of the TRAIN split, domains mixed with the
  same weights the training run samples with (see ``domain_weights``).
* Saves transformers-format files (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
  into the model folder.
* Encodes every split of every domain into ``runs/tokens/<domain>.<split>.u16`` (uint16 ids, each
  document followed by the eos token) plus ``runs/tokens/index.json`` with token counts.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 8192
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SEED = 1234


def read_docs(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def domain_weights(byte_counts: dict[str, int], alpha: float = 0.5) -> dict[str, float]:
    """Sampling weight per domain proportional to size**alpha (flattens the size skew)."""
    w = {d: float(b) ** alpha for d, b in byte_counts.items()}
    s = sum(w.values())
    return {d: v / s for d, v in sorted(w.items())}


def train_tokenizer(corpus: Path, model_dir: Path, sample_mb: float):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    domains = sorted(p.name for p in corpus.iterdir() if (p / "train.jsonl").exists())
    sizes = {d: (corpus / d / "train.jsonl").stat().st_size for d in domains}
    weights = domain_weights(sizes)
    rng = random.Random(SEED)
    texts = []
    for d in domains:
        budget = weights[d] * sample_mb * 1e6
        docs = [r["text"] for r in read_docs(corpus / d / "train.jsonl")]
        rng.shuffle(docs)
        used = 0
        for t in docs:
            if used >= budget:
                break
            texts.append(t)
            used += len(t.encode())
    rng.shuffle(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None,
                                   pad_token=PAD, model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    model_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(model_dir)   # chat_template.jinja beside the tokenizer files
    print(f"tokenizer: trained on {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB, vocab {tok.get_vocab_size()}")
    return fast


def encode_corpus(corpus: Path, model_dir: Path, out: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    out.mkdir(parents=True, exist_ok=True)
    index = {"eos_id": eos, "vocab_size": tok.get_vocab_size(), "domains": {}}
    for d in sorted(p.name for p in corpus.iterdir() if (p / "train.jsonl").exists()):
        index["domains"][d] = {}
        for split in ("train", "validation", "test"):
            docs = [r["text"] for r in read_docs(corpus / d / f"{split}.jsonl")]
            ids = []
            for enc in tok.encode_batch(docs):
                ids.extend(enc.ids)
                ids.append(eos)
            arr = np.asarray(ids, dtype=np.uint16)
            arr.tofile(out / f"{d}.{split}.u16")
            nbytes = sum(len(t.encode()) for t in docs)
            index["domains"][d][split] = {"tokens": int(arr.size), "docs": len(docs), "bytes": nbytes}
        tr = index["domains"][d]["train"]
        print(f"{d:12s} train tokens {tr['tokens'] / 1e6:6.2f}M  bytes/token {tr['bytes'] / max(tr['tokens'], 1):.2f}",
              flush=True)
    (out / "index.json").write_text(json.dumps(index, indent=1))


# The model is a base model: a conversation becomes plain text (system text, then "Q: "/"A: "
# lines, ending with "A:" for the answer), so chat clients of an OpenAI-compatible server get a
# continuation rather than an error.
CHAT_TEMPLATE = (    '{%- for m in messages -%}\n'
    "{%- if m['role'] == 'system' -%}{{ m['content'] }}{{ '\\n\\n' }}\n"
    "{%- elif m['role'] == 'user' -%}{{ 'Q: ' + m['content'] + '\\n' }}\n"
    "{%- else -%}{{ 'A: ' + m['content'] + '\\n' }}\n"
    '{%- endif -%}\n'
    '{%- endfor -%}\n'
    "{%- if add_generation_prompt -%}{{ 'A:' }}{%- endif -%}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(REPO / "runs/corpus"))
    ap.add_argument("--model-dir", default=str(REPO / "models/lynx-ref-moe"))
    ap.add_argument("--tokens", default=str(REPO / "runs/tokens"))
    ap.add_argument("--sample-mb", type=float, default=30.0)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    if not args.skip_train:
        train_tokenizer(Path(args.corpus), Path(args.model_dir), args.sample_mb)
    encode_corpus(Path(args.corpus), Path(args.model_dir), Path(args.tokens))


if __name__ == "__main__":
    main()
