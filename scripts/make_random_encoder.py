"""Write a randomly initialised BERT encoder folder of a chosen shape, for speed measurements only.

Timing does not depend on weight values, so a BERT-base-shaped model (12 layers, 768 wide) with random
weights measures what a real 768-d embedding model costs, on machines where the real weights cannot be
fetched or carried. Its vectors mean nothing: use it for `trtrag bench` latency, never for recall.
The tokenizer (BERT uncased word pieces) is copied from a real model folder.

Usage: python scripts/make_random_encoder.py --tokenizer-from DIR --out DIR [--layers 12 --hidden 768]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer-from", type=Path, required=True, help="a model folder with tokenizer.json")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(args.seed)
    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=4 * args.hidden, max_position_embeddings=512, vocab_size=30522)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    BertModel(config).half().save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (args.tokenizer_from / name).is_file():
            shutil.copy(args.tokenizer_from / name, tmp / name)
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": args.hidden,
                                                                "pooling_mode_mean_tokens": True}))
    (tmp / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(json.dumps({"out": str(args.out), "layers": args.layers, "hidden": args.hidden,
                      "parameters": sum(p.numel() for p in BertModel(config).parameters())}))


if __name__ == "__main__":
    main()
