"""Recompute flags: which activations a block keeps for backward and which it recomputes.

Flags (as the reference Surogate): block, att, ffn, qkv, swiglu, rmsnorm. Implications: block => att + ffn +
rmsnorm; att => qkv; ffn => swiglu. What each recomputes (else it is saved in forward):
  ln1 (attention RMSNorm output): rmsnorm or att;   ln2 (MLP RMSNorm output): rmsnorm or ffn;
  qkv (projection, QK-norm, RoPE): qkv;            attention output + logsumexp: att;
  gate_up (MLP up projection): ffn;                 swiglu output: swiglu;
  block: the whole layer is rerun in backward from its input residual (the only tensor kept per layer).
Recompute reruns the same ops on the same inputs, so it never changes the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ._errors import ModelError


@dataclass(frozen=True)
class Recompute:
    block: bool = False
    att: bool = False
    ffn: bool = False
    qkv: bool = False
    swiglu: bool = False
    rmsnorm: bool = False

    @classmethod
    def parse(cls, spec: str | dict | Recompute | None) -> Recompute:
        """None / "none" / "block" / "att,ffn" / {"recompute_block": True, ...} (the `recompute_` prefix optional)."""
        if spec is None or isinstance(spec, Recompute):
            flags = spec or cls()
            return flags._implied()
        names = [f.name for f in fields(cls)]
        if isinstance(spec, str):
            items = [s.strip() for s in spec.replace(",", " ").split()]
            chosen = {s: True for s in items if s and s != "none"}
        elif isinstance(spec, dict):
            chosen = {k: bool(v) for k, v in spec.items()}
        else:
            raise ModelError(f"recompute must be a string, a dict or None, got {type(spec).__name__}")
        values = {}
        for key, on in chosen.items():
            name = key.removeprefix("recompute_")
            if name not in names:
                raise ModelError(f"recompute: unknown flag {key!r}; choose from {', '.join(names)} (or none).")
            values[name] = on
        return cls(**values)._implied()

    def _implied(self) -> Recompute:
        att = self.att or self.block
        ffn = self.ffn or self.block
        return Recompute(
            block=self.block,
            att=att,
            ffn=ffn,
            qkv=self.qkv or att,
            swiglu=self.swiglu or ffn,
            rmsnorm=self.rmsnorm or self.block,
        )

    # what the block halves keep for backward
    @property
    def keep_ln1(self) -> bool:
        return not (self.rmsnorm or self.att)

    @property
    def keep_ln2(self) -> bool:
        return not (self.rmsnorm or self.ffn)

    @property
    def keep_qkv(self) -> bool:
        return not self.qkv

    @property
    def keep_attention(self) -> bool:
        return not self.att

    @property
    def keep_gate_up(self) -> bool:
        return not self.ffn

    @property
    def keep_swiglu(self) -> bool:
        return not self.swiglu
