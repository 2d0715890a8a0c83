"""Vocabulary trimming: a token table keeps the rows its train data reads; every other id shares one row.

A table trained from scratch on the train split has learned nothing in the
rows of the ids that split never shows: they got no gradient and hold their
random start (shrunk by weight decay at most). In a small user model over
MiniLM's 30,522 ids they are most of the parameters (1,412 ids of the
emoji names: 95% of a 16-wide table's rows). Trimming keeps the rows the
train split reaches, as the forward calls the table (token and position
tables alike), and gives every other id one shared row: the mean of the rows
it replaces. The model becomes a TrimmedEmbedding (an int32 id-to-row map,
then the table), recorded as a structure step so the artifact rebuilds.

Which tables (compression.vocabulary):
- "auto": those a user's model factory initializes at random (it builds them
  differently under two seeds) in a model the source stage trained on this
  train split; the built-in models' tables stay whole. A pretrained table (the built-in MiniLM's, one the factory
  loads) or weights trained elsewhere (--weights) keep every row: their
  unseen rows hold what was learned on other data.
- "train": every table, pretrained or not (the rows of ids the train split
  never shows are given up).
- "whole": none.
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping, Sequence

import torch
from torch import nn

from pipeline.compression.structure import append_step, replace_module
from pipeline.compression.trimmed import TrimmedEmbedding
from pipeline.data.encode import Encoded

Vocabulary = Literal["auto", "train", "whole"]
BATCH = 64
# The built-in models' tables: MiniLM's is pretrained; fused-tiny's starts at random, but it is the small stand-in
# the tests and benchmarks use for the default model's path (its factorized embedding among it), so "auto" keeps it whole too.
BUILT_IN = "a built-in model: its text encoder's tables are MiniLM's (or fused-tiny's stand-ins for them); compression.vocabulary = \"train\" trims them"


def token_tables(model: nn.Module) -> dict[str, nn.Embedding]:
    """The model's embedding tables that are not trimmed yet."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Embedding) and not isinstance(m, TrimmedEmbedding)}


def rows_read(model: nn.Module, data: Encoded, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The distinct ids each named table is called with over data (tables the forward never calls are left out)."""
    seen: dict[str, list[torch.Tensor]] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda _m, args, n=n: seen.setdefault(n, []).append(torch.unique(args[0]))) for n in names]
    try:
        with torch.inference_mode():
            model.eval()
            for batch in data.batches(BATCH):  # data's inputs are in the model's forward order
                model(*(torch.from_numpy(array) for array in batch.values()))
    finally:
        for hook in hooks:
            hook.remove()
    return {n: torch.unique(torch.cat(parts)).long() for n, parts in seen.items()}


def random_start(build: Callable[[], nn.Module], names: Sequence[str]) -> set[str]:
    """The named tables the model's builder initializes at random: their weights differ between two seeds.

    The global random state is left as it was (the build's own training must not see these draws).
    """
    tables = []
    for seed in (0, 1):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            fresh = dict(build().named_modules())
            tables.append({n: fresh[n].weight.detach().clone() for n in names if n in fresh})
    first, second = tables
    return {n for n in first if n in second and first[n].shape == second[n].shape and not torch.equal(first[n], second[n])}


def trim_table(table: nn.Embedding, kept: torch.Tensor) -> TrimmedEmbedding:
    """table's kept rows and one shared row (the mean of the others) behind an id-to-row map."""
    kept_list = kept.tolist()
    trimmed = TrimmedEmbedding(kept_list, table.num_embeddings, table.embedding_dim, table.padding_idx)
    dropped = torch.ones(table.num_embeddings, dtype=torch.bool)
    dropped[kept] = False
    with torch.no_grad():
        trimmed.weight[: len(kept_list)] = table.weight[kept]
        trimmed.weight[len(kept_list)] = table.weight[dropped].mean(0) if bool(dropped.any()) else 0.0
    return trimmed.to(table.weight.dtype)


def trim_vocabulary(model: nn.Module, mode: Vocabulary, trained_here: bool, build: Callable[[], nn.Module],
                    train: Encoded, calib: Encoded, keep: Sequence[str] = (), built_in: bool = False) -> dict:
    """Trim model's tables in place as the mode says (see the module doc); the facts of what was kept, and why a table was not.

    keep: modules neither structural stage changes (compression.keep): a table in one keeps every row.
    built_in: a built-in fused model, whose tables "auto" leaves whole (see BUILT_IN).
    """
    tables = token_tables(model)
    if mode == "whole":
        return {"mode": mode, "trimmed": [], "whole": {n: 'compression.vocabulary = "whole"' for n in tables}}
    whole = {n: "pinned (compression.keep)" for n in tables if any(n == k or n.startswith(k + ".") for k in keep)}
    candidates = [n for n in tables if n not in whole]
    if mode == "auto" and candidates and built_in:
        return {"mode": mode, "trimmed": [], "whole": whole | {n: BUILT_IN for n in candidates}}
    if mode == "auto" and candidates:
        if not trained_here:
            return {"mode": mode, "trimmed": [], "whole": whole | {n: "weights trained elsewhere (--weights): unseen ids' rows may hold what they learned"
                                                                   for n in candidates}}
        fresh = random_start(build, candidates)
        whole |= {n: "pretrained: the factory builds the same rows under two seeds" for n in candidates if n not in fresh}
        candidates = [n for n in candidates if n in fresh]
    used = rows_read(model, train, candidates) if candidates else {}
    trimmed = []
    for name in candidates:
        table = tables[name]
        if name not in used:
            whole[name] = "the forward does not call it"
            continue
        kept = used[name][(used[name] >= 0) & (used[name] < table.num_embeddings)]
        if len(kept) + 1 >= table.num_embeddings:
            whole[name] = f"the train split reads {len(kept)} of its {table.num_embeddings} rows"
            continue
        replace_module(model, name, trim_table(table, kept))
        trimmed.append({"module": name, "vocabulary": table.num_embeddings, "kept": kept.tolist()})
    if not trimmed:
        return {"mode": mode, "trimmed": [], "whole": whole}
    append_step(model, {"op": "trim_vocabulary", "tables": trimmed})
    read = rows_read(model, calib, [t["module"] for t in trimmed])
    return {"mode": mode, "trimmed": [table_facts(model, t, read.get(t["module"], torch.zeros(0, dtype=torch.long))) for t in trimmed], "whole": whole}


def table_facts(model: nn.Module, trimmed: Mapping, calib_ids: torch.Tensor) -> dict:
    """Rows before and after, and how many of the distinct ids calib reads the table with still have a row of their own."""
    name, kept = trimmed["module"], set(trimmed["kept"])
    table = model.get_submodule(name)
    return {"module": name, "rows_before": trimmed["vocabulary"], "rows_after": table.num_embeddings, "ids_kept": len(kept),
            "params_removed": (trimmed["vocabulary"] - table.num_embeddings) * table.embedding_dim,
            "calib_ids": len(calib_ids), "calib_ids_with_own_row": sum(1 for i in calib_ids.tolist() if i in kept),
            "shared_row": "the mean of the dropped rows"}
