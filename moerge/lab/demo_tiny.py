"""A self-contained demo on a tiny model: build a small expert library and serve it routed (`make demo-tiny`).

Everything is trained here, on CPU, in under a minute, so nothing is downloaded:

1. a tiny Llama learns to copy digit strings (``31415=31415``): the "base model";
2. PEFT trains one LoRA expert per task on it — ``reverse``, ``sort`` — and a full fine-tune learns ``increment``
   (every digit + 1), added as a diff vector;
3. the experts go into an :class:`~moerge.ExpertLibrary`, a :class:`~moerge.MoErgeModel` serves them: each row of
   one batch uses another expert (or a mix), with the routing trace per row;
4. a fourth expert (``rotate``) is added to the live model post hoc, and a merge folds one expert into a plain model.

Run with ``python -m moerge.lab.demo_tiny [--out DIR] [--steps N]``.
"""

from __future__ import annotations

import argparse
import copy
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moerge import ExpertLibrary, MoErgeModel

DIGITS = "0123456789"
CHARS = DIGITS + "="
PAD, BOS, EOS = 0, 1, 2
STOI = {c: i + 3 for i, c in enumerate(CHARS)}
ITOS = {i: c for c, i in STOI.items()}
LEN = 5  # digits per prompt

TASKS: dict[str, tuple[Callable[[str], str], str]] = {
    "copy": (lambda s: s, "Repeat the digits unchanged."),
    "reverse": (lambda s: s[::-1], "Reverse the order of the digits."),
    "sort": (lambda s: "".join(sorted(s)), "Sort the digits in ascending order."),
    "increment": (lambda s: "".join(str((int(c) + 1) % 10) for c in s), "Add one to every digit, 9 wraps to 0."),
    "rotate": (lambda s: s[1:] + s[0], "Move the first digit to the end."),
}


def encode(s: str) -> list[int]:
    return [BOS] + [STOI[c] for c in s]


def decode(ids: list[int]) -> str:
    return "".join(ITOS.get(i, "") for i in ids if i not in (PAD, BOS, EOS))


def sample(task: str, n: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    """``n`` examples ``<bos>ddddd=answer<eos>`` and their digit strings."""
    fn = TASKS[task][0]
    rows, strings = [], []
    for _ in range(n):
        s = "".join(rng.choice(DIGITS) for _ in range(LEN))
        rows.append(encode(s + "=" + fn(s)) + [EOS])
        strings.append(s)
    return torch.tensor(rows), strings


PROMPT_LEN = 1 + LEN + 1  # <bos> digits '='


def train(model: torch.nn.Module, task: str, steps: int, lr: float, seed: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x, _ = sample(task, 64, rng)
        labels = x.clone()
        labels[:, :PROMPT_LEN] = -100  # learn the answer only
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def tiny_base(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(CHARS) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    model = LlamaForCausalLM(cfg)
    model.config._name_or_path = "moerge-demo-tiny-llama"
    return model


def accuracy(model, task: str, n: int = 100, experts=None, seed: int = 123) -> float:
    x, strings = sample(task, n, random.Random(seed))
    kw = {} if experts is None else {"experts": experts}
    with torch.no_grad():
        out = model.generate(input_ids=x[:, :PROMPT_LEN], attention_mask=torch.ones_like(x[:, :PROMPT_LEN]),
                             max_new_tokens=LEN + 1, do_sample=False, pad_token_id=PAD, **kw)
    fn = TASKS[task][0]
    return sum(decode(out[i, PROMPT_LEN:].tolist()) == fn(s) for i, s in enumerate(strings)) / n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo", help="folder for the adapters and the library (recreated)")
    ap.add_argument("--steps", type=int, default=400, help="training steps per expert")
    args = ap.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.time()

    print("== 1. the base model: a tiny Llama that learns to copy digit strings")
    base = tiny_base()
    loss = train(base, "copy", args.steps, 3e-3, seed=1)
    base.requires_grad_(False)
    print(f"   copy loss {loss:.4f}, copy accuracy {accuracy(base, 'copy'):.0%}")

    print("== 2. experts: PEFT LoRA adapters for reverse and sort, a full fine-tune for increment")
    lib = ExpertLibrary.create(out / "library", base_model=base)
    for i, task in enumerate(["reverse", "sort"]):
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                            lora_dropout=0.0))
        loss = train(pm, task, args.steps, 1e-2, seed=10 + i)
        pm.save_pretrained(str(out / "adapters" / task))
        lib.add_peft(out / "adapters" / task, name=task, description=TASKS[task][1],
                     examples=[s + "=" for s in sample(task, 3, random.Random(i))[1]])
        print(f"   {task:<9} LoRA r=8 on all linear layers, loss {loss:.4f}  ->  {out / 'adapters' / task}")
    ft = copy.deepcopy(base)
    for m in ft.modules():  # a full fine-tune of every linear layer (norms and embeddings stay frozen)
        if isinstance(m, torch.nn.Linear):
            m.weight.requires_grad_(True)
    loss = train(ft, "increment", args.steps, 3e-3, seed=20)
    lib.add_delta(ft.requires_grad_(False), base, name="increment", rank=16, description=TASKS["increment"][1])
    print(f"   increment full fine-tune of the linear layers, loss {loss:.4f}, stored as its rank-16 diff vector")
    print(f"   library: {lib}")
    for name in lib:
        info = lib.info(name)
        print(f"     {name:<9} kind={info['kind']:<5} ranks={info['ranks']} modules={info['modules']} "
              f"params={info['parameters']:,}  {info['description']}")

    print("== 3. one model, every expert: exact-match accuracy on 100 prompts per task")
    model = MoErgeModel.from_library(base, ExpertLibrary.open(out / "library"))
    tasks = ["reverse", "sort", "increment"]
    header = "   routing            " + "".join(f"{t:>11}" for t in tasks)
    print(header)
    for label, mix in [("base (no expert)", {}), *[(f"expert {e}", {e: 1.0}) for e in tasks]]:
        accs = [accuracy(model, t, experts=mix) for t in tasks]
        print(f"   {label:<19}" + "".join(f"{a:>11.0%}" for a in accs))

    print("== 4. one batch, a different expert (or mix) per row, with the routing trace")
    prompts = ["31415", "27182", "16180", "14142"]
    mixes = [{"reverse": 1.0}, {"sort": 1.0}, {"increment": 1.0}, {"reverse": 0.5, "sort": 0.5}]
    ids = torch.tensor([encode(p + "=") for p in prompts])
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), experts=mixes, max_new_tokens=LEN + 1,
                         do_sample=False, pad_token_id=PAD)
    for b, p in enumerate(prompts):
        print(f"   {p}= -> {decode(gen[b, PROMPT_LEN:].tolist()):<6}  routing: "
              + ", ".join(f"{n} {w:.2f}" for n, w in model.last_routing[b].experts.items()))
    print("   model.explain():")
    print("\n".join("     " + line for line in model.explain().splitlines()))

    print("== 5. add an expert to the live model, post hoc (nothing else retrained or reloaded)")
    pm = get_peft_model(model.copy_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                                      lora_dropout=0.0))
    train(pm, "rotate", args.steps, 1e-2, seed=30)
    pm.save_pretrained(str(out / "adapters" / "rotate"))
    model.add_expert(out / "adapters" / "rotate", name="rotate", description=TASKS["rotate"][1])
    print(f"   experts now: {model.experts}; rotate accuracy {accuracy(model, 'rotate', experts={'rotate': 1.0}):.0%}"
          f" (base {accuracy(model, 'rotate', experts={}):.0%}); reverse still "
          f"{accuracy(model, 'reverse', experts={'reverse': 1.0}):.0%}")

    print("== 6. merge: fold one expert into a plain transformers model (no routing overhead)")
    plain = model.merge({"sort": 1.0})
    print(f"   {type(plain).__name__}: sort accuracy {accuracy(plain, 'sort'):.0%}")
    print(f"done in {time.time() - t0:.1f} s; library at {out / 'library'}")


if __name__ == "__main__":
    main()
