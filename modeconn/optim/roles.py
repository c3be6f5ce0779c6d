"""Which part of the network each parameter is, decided by the module that owns it, not by its name.

Roles:
- matrix: 2-D weights of linear layers inside the transformer blocks (Q/K/V, O, fc, proj)
- embedding: token and position embeddings (a tied lm_head is the token embedding)
- head: an untied lm_head
- norm: LayerNorm gains
- bias: every bias
The optimizers use these roles for weight decay and (Muon) for routing.
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch.nn as nn

Role = Literal["matrix", "embedding", "head", "norm", "bias"]


def parameter_roles(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, Role]]:
    """(name, parameter, role) for every distinct parameter; a tied weight appears once. A model
    names its blocks (whose linear weights are the `matrix` role) in `block_modules`, dotted module
    names: GPT's `transformer.h`, a testbed net's `hidden` layer."""
    seen: set[int] = set()
    block_modules = {id(m) for name in getattr(model, "block_modules", ()) for m in model.get_submodule(name).modules()}
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            yield name, p, _role(module, pname, id(module) in block_modules)


def _role(module: nn.Module, pname: str, in_block: bool) -> Role:
    if pname == "bias":
        return "bias"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm):
        return "norm"
    if isinstance(module, nn.Linear):
        return "matrix" if in_block else "head"
    raise ValueError(f"parameter {pname} of {type(module).__name__} has no known role")
