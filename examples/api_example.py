"""titanenv from Python: tokenize the sample text, train, evaluate with lm-eval, generate.

    ./container_run.sh python examples/api_example.py --out /tmp/titanenv-api --steps 20

Everything runs on this machine and offline (the GPT-2 tokenizer and the text ship in
sample_data/, the lm-eval tasks in titanenv). On a cluster, train with ``titanenv train --submit``
or the sbatch files instead, then call ``api.evaluate`` and ``api.generate`` on the run folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from titanenv import api
from titanenv.data import preprocess

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
TOKENIZER = SAMPLE / "gpt2_tokenizer.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the data, the run and the results.")
    parser.add_argument("--steps", type=int, default=20, help="Training steps.")
    parser.add_argument("--seq-len", type=int, default=128, help="Tokens per training sample.")
    parser.add_argument("--limit", type=float, default=4, help="Documents per lm-eval task.")
    args = parser.parse_args()

    data = args.out / "data" / "train"
    preprocess.run(
        preprocess.PreprocessConfig(
            inputs=sorted(SAMPLE.glob("c4-sample.*.json.gz")),
            output_prefix=data,
            tokenizer_model=str(TOKENIZER),
            append_eod=True,
        )
    )
    run = api.train(data, TOKENIZER, args.out / "run", steps=args.steps, seq_len=args.seq_len, batch_size=4)
    print(f"trained to step {run.step}: {run.checkpoint}")

    results = api.evaluate([run.output_dir], tasks=["titanenv_wikitext2"], limit=args.limit)
    for row in results.rows:
        print(f"{row.task} {row.shots}-shot {row.metric}: {row.value:.4g}")
    print(f"table: {results.markdown}")

    text = api.generate(run.output_dir, ["The history of"], max_new_tokens=16, greedy=True)[0]
    print(f"The history of{text}")


if __name__ == "__main__":
    main()
