"""The sweep's input: one base (+ adapters), N quantization configurations, one objective.

A :class:`SweepSpec` is the ``sweep`` flow's parameter (so the Prefect UI renders it as a form)
and what ``modelfactory sweep --spec sweep.yaml`` reads. Configurations come from a grid (the
cartesian product of :class:`QuantGrid`'s lists, applied to the ``quantize`` template) or from an
explicit list of partial quantization settings; optionally every configuration is benchmarked
with each of several inference kernels. :meth:`SweepSpec.members` expands it; each member is
built, benchmarked and gated exactly like a plain factory run (:meth:`SweepSpec.member_spec`),
so a sweep of one configuration *is* a plain run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from modelfactory.core.specs import (
    AdapterSpec,
    BenchmarkSpec,
    FactorySpec,
    GateSpec,
    MergeSpec,
    ModelSource,
    PublishSpec,
    QuantSpec,
    Spec,
    merge_overrides,
    read_spec_file,
    validate_spec,
)

#: What "best" means among builds that passed their gate, for a sweep's winner and ``catalog best`` alike:
#: the best value of the objective's metric (:data:`OBJECTIVE_METRICS`) on the Pareto front of (perplexity
#: increase, that metric) (``modelfactory.catalog.queries.pareto_front``).
Objective = Literal["speed", "size", "memory", "quality"]
#: Each objective's metric (a run column and sweep-member field, side ``delta``) and whether higher is better:
#: decode speed-up at batch 1; disk size and memory after load relative to fp16; KL divergence from fp16.
OBJECTIVE_METRICS: dict[str, tuple[str, bool]] = {
    "speed": ("decode_speedup", True),
    "size": ("size_ratio", False),
    "memory": ("memory_ratio", False),
    "quality": ("kld_mean", False),
}
#: What a sweep publishes: the winner only, every passing configuration, or nothing.
PublishMode = Literal["winner", "all_passing", "none"]
MAX_MEMBERS = 64
#: QuantSpec's quality levers a grid can cross (each a QuantGrid field of the same name).
QUALITY_LEVERS = ("act_group_aware", "static_groups", "mse", "gptaq", "foem", "damp_auto_increment")


class QuantGrid(Spec):
    """Lists to cross: every combination becomes one configuration (the template fills the rest)."""

    bits: tuple[int, ...] | None = Field(default=None, min_length=1, description="Weight bits to try.")
    group_size: tuple[int, ...] | None = Field(default=None, min_length=1, description="Group sizes to try.")
    desc_act: tuple[bool, ...] | None = Field(default=None, min_length=1, description="Act-order on/off.")
    damp_percent: tuple[float, ...] | None = Field(default=None, min_length=1, description="Dampening values.")
    calibration_samples: tuple[int, ...] | None = Field(
        default=None, min_length=1, description="Calibration sequence counts to try.")
    act_group_aware: tuple[bool | Literal["auto"], ...] | None = Field(
        default=None, min_length=1, description="Act-group-aware reordering on/off/auto.")
    static_groups: tuple[bool, ...] | None = Field(default=None, min_length=1, description="Static groups on/off.")
    mse: tuple[float, ...] | None = Field(
        default=None, min_length=1, description="Clipping-search exponents to try (0: off).")
    gptaq: tuple[bool, ...] | None = Field(default=None, min_length=1, description="GPTAQ on/off.")
    foem: tuple[bool, ...] | None = Field(default=None, min_length=1, description="FOEM on/off.")
    damp_auto_increment: tuple[float, ...] | None = Field(
        default=None, min_length=1, description="Dampening retry steps to try.")

    def overrides(self) -> list[dict[str, Any]]:
        """One ``quantize`` override dict per combination, in a stable order."""
        axes: list[tuple[str, tuple[Any, ...]]] = [
            (name, values) for name, values in (
                ("bits", self.bits), ("group_size", self.group_size), ("desc_act", self.desc_act),
                ("damp_percent", self.damp_percent), ("calibration_samples", self.calibration_samples),
                *((lever, getattr(self, lever)) for lever in QUALITY_LEVERS))
            if values]
        combos = []
        for values in itertools.product(*(v for _, v in axes)):
            override: dict[str, Any] = {}
            for (name, _), value in zip(axes, values, strict=True):
                if name == "calibration_samples":
                    override["calibration"] = {"num_samples": value}
                else:
                    override[name] = value
            combos.append(override)
        return combos


class SweepMember(Spec):
    """One configuration of a sweep: its quantization, the kernel it is benchmarked with, its branch."""

    label: str
    quantize: QuantSpec
    kernel: str


class SweepSpec(Spec):
    """A sweep of quantization configurations of one merged model."""

    name: str = Field(default="sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", description="Sweep label.")
    base: ModelSource
    adapters: tuple[AdapterSpec, ...] = Field(default=(), description="LoRA adapters merged in order (once).")
    merge: MergeSpec = Field(default_factory=MergeSpec)
    quantize: QuantSpec = Field(default_factory=QuantSpec,
                                description="Template: fields the grid or list does not set come from here.")
    grid: QuantGrid | None = Field(default=None, description="Cross these lists (or give `configs`).")
    configs: tuple[dict[str, Any], ...] | None = Field(
        default=None, description="Explicit list of partial quantize settings, e.g. [{group_size: 64}, ...].")
    kernels: tuple[str, ...] = Field(
        default=(), description="Inference kernels to compare per configuration (default: benchmark.kernel).")
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    gate: GateSpec = Field(default_factory=GateSpec)
    objective: Objective = Field(
        default="quality", description="Winner among passing configurations: quality (lowest KL divergence from "
        "fp16), size (smallest on disk), speed (fastest decode at batch 1) or memory (least memory after load); "
        "the same choice as `catalog best --by`.")
    publish: PublishSpec = Field(default_factory=PublishSpec)
    publish_mode: PublishMode = Field(default="winner", description="winner, all_passing or none.")
    trust_remote_code: bool = Field(default=False, description="Allow models that ship Python code.")

    @model_validator(mode="after")
    def _one_source_of_configs(self) -> SweepSpec:
        if self.grid is not None and self.configs is not None:
            raise ValueError("give either `grid` or `configs`, not both")
        members = self.members()  # validates every configuration and the size
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"{len(members)} configurations exceed the limit of {MAX_MEMBERS}: narrow the grid")
        return self

    def quant_configs(self, resolve: Callable[[QuantSpec], QuantSpec] | None = None) -> list[QuantSpec]:
        """The distinct quantization configurations, template first-filled, in declaration order.

        *resolve* (the sweep flow passes the quantize step's ``group_size: auto`` rule for the merged
        model) is applied before duplicates are dropped, so ``auto`` and the size it resolves to are
        one configuration, labelled with the real size.
        """
        template = self.quantize.model_dump(mode="json")
        overrides = (self.grid.overrides() if self.grid is not None
                     else [dict(c) for c in self.configs] if self.configs is not None else [{}])
        seen: dict[str, QuantSpec] = {}
        for override in overrides:
            config = QuantSpec.model_validate(merge_overrides(template, override))
            if resolve is not None:
                config = resolve(config)
            seen.setdefault(config.model_dump_json(), config)
        return list(seen.values())

    def members(self, resolve: Callable[[QuantSpec], QuantSpec] | None = None) -> list[SweepMember]:
        """Every (configuration, kernel) pair with a unique branch-style label (*resolve*: see
        :meth:`quant_configs`)."""
        configs = self.quant_configs(resolve)
        kernels = self.kernels or (self.benchmark.kernel,)
        labels = _unique_labels(configs)
        return [SweepMember(label=label if len(kernels) == 1 else f"{label}-{kernel}", quantize=config,
                            kernel=kernel)
                for config, label in zip(configs, labels, strict=True) for kernel in kernels]

    def member_spec(self, member: SweepMember) -> FactorySpec:
        """The plain factory spec of one member; it publishes (if chosen) to its own branch, the label."""
        data = self.model_dump(mode="json", include={"base", "adapters", "merge", "benchmark", "gate",
                                                     "trust_remote_code"})
        data["name"] = f"{self.name}-{member.label}"[:64]
        data["quantize"] = member.quantize.model_dump(mode="json")
        data["benchmark"] = {**data["benchmark"], "kernel": member.kernel}
        data["publish"] = {**self.publish.model_dump(mode="json"), "revision": member.label}
        return FactorySpec.model_validate(data)


def _unique_labels(configs: list[QuantSpec]) -> list[str]:
    """``QuantSpec.label()`` (bits, group, levers), extended by what tells same-label configs apart."""
    base = [c.label() for c in configs]
    labels = []
    for config, label in zip(configs, base, strict=True):
        if base.count(label) > 1:
            label += f"-damp{config.damp_percent:g}-cal{config.calibration.num_samples}"
        labels.append(label)
    if len(set(labels)) != len(labels):  # differ in fields no label shows (sym, seq_len, ...): number them
        labels = [f"{label}-c{i}" for i, label in enumerate(labels)]
    return labels


def parse_sweep_spec(data: dict[str, Any], *, origin: str = "sweep spec") -> SweepSpec:
    """Validate a dict into a :class:`SweepSpec` (:class:`~modelfactory.core.errors.SpecError` with every problem)."""
    return validate_spec(SweepSpec, data, origin=origin)


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Read a YAML or JSON sweep spec file (``modelfactory sweep --spec``), reported as ``run --spec`` is."""
    return parse_sweep_spec(read_spec_file(path), origin=str(path))
