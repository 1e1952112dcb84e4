"""The ``captum-mllm`` command: ``demo`` (offline, tiny model) and ``explain``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def _explain(model, chat, target, n_samples: int, out: Path, max_new_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from captum.attr import ShapleyValueSampling

    from captum_mllm import ChatInput, MultimodalLLMAttribution

    inp = ChatInput(chat, model)
    attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model)
    gen_args = None if target else {"max_new_tokens": max_new_tokens}
    res = attr.attribute(
        inp, target=target, gen_args=gen_args, n_samples=n_samples, perturbations_per_eval=32
    )
    print(f"response: {res.response_text!r}")
    print(res.to_dataframe()[["feature", "turn", "role", "seq_attr"]].to_string(index=False))
    print(res)
    out.mkdir(parents=True, exist_ok=True)
    res.plot_seq_attr()[0].savefig(out / "seq_attr.png", bbox_inches="tight")  # type: ignore[index]
    res.plot_token_attr()[0].savefig(out / "token_attr.png", bbox_inches="tight")  # type: ignore[index]
    res.to_dataframe().to_csv(out / "attributions.csv", index=False)
    print(f"wrote {out}/seq_attr.png, token_attr.png, attributions.csv")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``captum-mllm`` command."""
    from captum_mllm import Chat

    parser = argparse.ArgumentParser(prog="captum-mllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="explain a chat with the tiny offline model")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"))
    explain = sub.add_parser("explain", help="explain a text chat with a Hugging Face model")
    explain.add_argument("--model", required=True, help="hub id or local path")
    explain.add_argument("--system", default=None)
    explain.add_argument("--user", required=True)
    explain.add_argument("--target", default=None, help="response to explain (default: generate)")
    explain.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    explain.add_argument("--out", type=Path, default=Path("outputs/explain"))
    for p in (demo, explain):
        p.add_argument("--n-samples", type=int, default=16)
        p.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from captum_mllm.testing import tiny_hf_adapter

        torch.manual_seed(0)
        model = tiny_hf_adapter()
        chat = Chat().system("You are a helpful assistant.").user("What is the capital of France?")
        target = "The capital of France is Paris."
    else:
        from captum_mllm import HFCausalLMAdapter

        model = HFCausalLMAdapter.from_pretrained(args.model, device=args.device)
        chat = Chat().system(args.system) if args.system else Chat()
        chat = chat.user(args.user)
        target = args.target
    _explain(model, chat, target, args.n_samples, args.out, args.max_new_tokens)


if __name__ == "__main__":
    main()
