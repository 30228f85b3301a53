"""The method registry: every fine-tuning method the suite compares, selectable by name.

:data:`REGISTRY` is the one home of what a method is: besides its builder below, its label, table
order, 4-bit twin, LoRA reference and benchmark entry, read by the aggregation and the figures
(:func:`method_label`, :func:`table_order`, :func:`fp32_twin`, :func:`lora_reference`,
:func:`benchmark_methods`). :data:`METHODS` is its trainable part, the names a run config may use.

Each :class:`MethodSpec` knows how to
* check a run config's budget against the model's layer shapes *before* any weight is loaded
  (:meth:`MethodSpec.check_budget`, on a model built on the ``meta`` device);
* load the base model (float, or NF4 for the 4-bit variants; :meth:`MethodSpec.load_base`);
* turn it into the trainable model (:meth:`MethodSpec.build`);
* build its optimizer (:meth:`MethodSpec.build_optimizer`): ``spiel.build_optimizer`` for SpIEL
  (SparseAdamW for AG, SM3 for MA; docs/METHOD.md §8.3), ``torch.optim.AdamW`` otherwise;
* whether it needs a ``spiel.SpielSelector`` (dynamic SpIEL only).

Budgets are matched (docs/METHOD.md §2.2): at rank r, LoRA has ``r * (in + out)`` parameters per
targeted layer, SHiRA exactly the same per layer, SpIEL ``N = r * Σ(in + out)`` in total, allocated
across layers in proportion to their size.

| name | family | base | selection |
|---|---|---|---|
| spiel-ag / qspiel-ag | SpIEL, accumulated-gradient growth | float / NF4 | linear reselection rate |
| spiel-ma / qspiel-ma | SpIEL, momentum-approximation growth (SM3) | float / NF4 | linear reselection rate |
| spiel-static | SpIEL without reselection (fixed random indices; ablation) | float | none |
| lora / qlora | peft LoRA (alpha 16, dropout 0.1) | float / NF4 | — |
| ia3 | peft (IA)3 | float | — |
| shira | peft SHiRA, static random sparse at LoRA's budget (ablation) | float | — |
| full | full fine-tuning | float | — |
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spielbench.errors import InputError

#: Methods whose budget is a LoRA rank (SpIEL also accepts a density instead).
FAMILIES_WITH_RANK = ("spiel", "lora", "shira")
#: ``spiel:`` keys of a run config that the method and budget decide, not the user.
SPIEL_RESERVED_KEYS = ("density", "num_tunable_weights", "lora_rank_equivalent", "selection_algorithm",
                       "num_deltas", "base_model_name_or_path", "seed", "base_model_dtype", "base_model_quantization")


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method of the comparison.

    Attributes:
        name: registry name, as the paper writes it (``spiel-ag``, ``qlora``, ...).
        family: "spiel", "lora", "ia3", "shira" or "full".
        quantized: base model loaded in NF4 with double quantization (``baselines.quant``).
        selection_algorithm: SpIEL growth rule, "ag" or "ma" (None for other families).
        reselection_rate_policy: SpIEL policy; "none" for the static ablation (None for other families).
        default_learning_rate: used when the run config leaves ``learning_rate`` unset; chosen for the
            CPU-scale default model (SmolLM2-135M), not the paper's 7B/13B grids.
        description: one line for tables and help text.
        label: display name in tables, claims and figures.
        order: position in tables (the paper's main-table order, then the ablations, then the 4-bit
            methods, then the benchmark-only entries); ties are broken by name.
        fp32_twin: for a 4-bit method, the fp32 method it is compared with at the same rank.
        lora_reference: the method whose cost (step time, memory) this one's is divided by at the same
            rank in the efficiency table (qLoRA for the 4-bit methods, LoRA otherwise).
        benchmark: whether the efficiency benchmark (``spielbench.benchmark``) has an entry for it.
        trainable: whether a run config may name it (False for the untuned ``base`` model and the
            benchmark-only ``floor`` and ``spiel-reference``).
        color: line colour in figures (a 4-bit method takes its fp32 twin's, drawn dashed).
    """

    name: str
    family: str
    quantized: bool
    default_learning_rate: float | None
    description: str
    selection_algorithm: str | None = None
    reselection_rate_policy: str | None = None
    label: str = ""
    order: int = 0
    fp32_twin: str | None = None
    lora_reference: str = "lora"
    benchmark: bool = True
    trainable: bool = True
    color: str = "#17becf"

    @property
    def takes_rank(self) -> bool:
        """Whether the budget is a LoRA rank (SpIEL, LoRA, SHiRA); (IA)3 and full FT have none."""
        return self.family in FAMILIES_WITH_RANK

    @property
    def needs_selector(self) -> bool:
        """Whether training must call a ``spiel.SpielSelector`` after each update (dynamic SpIEL)."""
        return self.family == "spiel" and self.reselection_rate_policy != "none"

    # ------------------------------------------------------------------------------ config checks

    def spiel_config(self, cfg):
        """The ``spiel.SpielConfig`` of a run: budget from ``rank``/``density``, rule from the method.

        Raises:
            InputError: a reserved or unknown ``spiel.*`` key, or a value ``SpielConfig`` rejects
                (the message names ``spiel.<field>``).
        """
        from spiel.config import SpielConfig

        known = {f.name for f in dataclasses.fields(SpielConfig)}
        for key in cfg.spiel:
            if key in SPIEL_RESERVED_KEYS:
                where = "rank/density" if key in ("density", "num_tunable_weights", "lora_rank_equivalent") \
                    else "seed" if key == "seed" else "method and model" if key.startswith("base_model") else "method"
                raise InputError(f"spiel.{key}: set by the run's {where}, not under spiel")
            if key not in known:
                allowed = sorted(known - set(SPIEL_RESERVED_KEYS))
                raise InputError(f"spiel.{key}: unknown SpIEL option; known: {', '.join(allowed)}")
        if (self.reselection_rate_policy == "none" and "reselection_rate_policy" in cfg.spiel
                and cfg.spiel["reselection_rate_policy"] != "none"):
            raise InputError(f"spiel.reselection_rate_policy: method {self.name!r} is static (policy 'none'), "
                             f"got {cfg.spiel['reselection_rate_policy']!r}")
        if self.reselection_rate_policy != "none" and cfg.spiel.get("reselection_rate_policy") == "none":
            raise InputError(f"spiel.reselection_rate_policy: 'none' (no reselection) turns {self.name!r} into the "
                             "static ablation; use method 'spiel-static' instead")
        from baselines.lora import TARGET_MODULES

        kwargs: dict[str, Any] = {
            "target_modules": list(TARGET_MODULES),
            "selection_algorithm": self.selection_algorithm,
            "reselection_rate_policy": self.reselection_rate_policy,
            "seed": cfg.seed,
        }
        if self.quantized:  # the reference trains qSpIEL deltas in bf16 (docs/METHOD.md §6); CPU keeps fp32
            device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            kwargs["delta_dtype"] = "bfloat16" if device.startswith("cuda") else "float32"
        kwargs.update(cfg.spiel)
        if cfg.density is not None:
            kwargs["density"] = cfg.density
        else:
            kwargs["lora_rank_equivalent"] = cfg.rank
        try:
            return SpielConfig(**kwargs)
        except ValueError as exc:
            field_name, _, detail = str(exc).partition(":")
            if field_name in ("density", "lora_rank_equivalent"):
                name = "density" if field_name == "density" else "rank"
                raise InputError(f"{name}: {detail.strip()}") from None
            raise InputError(f"spiel.{exc}") from None

    def check_config(self, cfg) -> None:
        """Check the method-specific fields of a run config (no model needed).

        Raises:
            InputError: rank missing for a ranked method, rank given to (IA)3/full, density given to a
                non-SpIEL method, both rank and density for SpIEL, ``spiel:`` options for a non-SpIEL
                method, or a bad ``spiel.*`` value.
        """
        if self.family == "spiel":
            if cfg.rank is not None and cfg.density is not None:
                raise InputError(f"rank/density: method {self.name!r} takes one budget, got rank={cfg.rank} "
                                 f"and density={cfg.density}")
            if cfg.rank is None and cfg.density is None:
                raise InputError(f"rank: method {self.name!r} needs a rank (LoRA-equivalent budget) or a density")
            self.spiel_config(cfg)
            return
        if cfg.density is not None:
            raise InputError(f"density: only SpIEL methods take a density; method {self.name!r} does not")
        if cfg.spiel:
            raise InputError(f"spiel: SpIEL options given to method {self.name!r}, which is not a SpIEL method")
        if self.takes_rank and cfg.rank is None:
            raise InputError(f"rank: method {self.name!r} needs a rank (its parameter budget)")
        if not self.takes_rank and cfg.rank is not None:
            raise InputError(f"rank: method {self.name!r} takes no rank (its budget is fixed), got {cfg.rank}")

    def check_budget(self, cfg, meta_model: torch.nn.Module) -> dict[str, Any]:
        """Check that the budget fits the model's targeted layers and compute the expected budget.

        Args:
            cfg: the run config (``check_config`` already passed).
            meta_model: the model built from its config on the ``meta`` device (shapes only).

        Returns:
            ``{"rank", "density", "trainable_params", "total_params"}``: the trainable count this method
            will have, and ``density`` = trainable / total parameters of the base model.

        Raises:
            InputError: the rank (or density) is larger than a targeted layer allows: for LoRA
                ``rank <= min(in, out)`` per layer; for SHiRA ``rank * (in + out) <= in * out`` per layer;
                for SpIEL every layer's proportional share ``k_m = floor(N * numel_m / Σ numel)`` must lie in
                ``[1, numel_m]`` (i.e. ``N <= Σ in * out``). Also: no targeted layer found.
        """
        from baselines.lora import TARGET_MODULES, targeted_linears
        from baselines.shira import max_shira_rank
        from spielbench.measure import count_parameters

        total = count_parameters(meta_model)
        layers = targeted_linears(meta_model, TARGET_MODULES)
        if self.family != "full" and not layers:
            raise InputError(f"model: no layer named {', '.join(TARGET_MODULES)} to adapt (LLaMA-style model expected)")
        r = cfg.rank
        if self.family == "lora":
            for name, fin, fout in layers:
                if r > min(fin, fout):
                    raise InputError(f"rank: {r} is larger than the layer allows: {name} ({fin} -> {fout}) admits "
                                     f"at most rank {min(fin, fout)} for {self.name}")
            trainable = sum(r * (fin + fout) for _, fin, fout in layers)
        elif self.family == "shira":
            for name, fin, fout in layers:
                if r * (fin + fout) > fin * fout:
                    raise InputError(f"rank: {r} is larger than the layer allows: {name} ({fin} -> {fout}) admits "
                                     f"at most rank {max_shira_rank(fin, fout)} for shira (rank*(in+out) <= in*out)")
            trainable = sum(r * (fin + fout) for _, fin, fout in layers)
        elif self.family == "spiel":
            from spiel.budget import compute_num_deltas

            spiel_cfg = self.spiel_config(cfg)
            what = "density" if cfg.density is not None else "rank"
            value = cfg.density if cfg.density is not None else r
            try:  # the exact per-matrix allocation (floor of the proportional share; docs/METHOD.md §2.2)
                trainable = sum(compute_num_deltas(meta_model, spiel_cfg).values())
            except ValueError as exc:
                small = "k = 0" in str(exc) or "at least 1 trainable parameter" in str(exc)
                kind = "is too small" if small else "is larger than the layers allow"
                raise InputError(f"{what}: {value} {kind} for {self.name}: {exc}") from None
        elif self.family == "ia3":
            from baselines.ia3 import FEEDFORWARD_MODULES

            trainable = sum(fin if name.rsplit(".", 1)[-1] in FEEDFORWARD_MODULES else fout
                            for name, fin, fout in layers)
        else:  # full
            trainable = total
        return {"rank": r if self.takes_rank else None, "density": trainable / total if total else None,
                "trainable_params": trainable, "total_params": total,
                "requested_density": cfg.density}

    # ------------------------------------------------------------------------------- build / train

    def load_base(self, model_path: str | Path, device: str):
        """Load the base model for this method: NF4 for the 4-bit variants, else float.

        Float models are float32 on CPU; on CUDA the base weights of adapter methods are bfloat16 (as in
        the reference), full fine-tuning keeps float32 master weights (bf16 autocast is used instead).
        """
        if self.quantized:
            from baselines.quant import load_nf4_model

            return load_nf4_model(model_path, device)
        from transformers import AutoModelForCausalLM

        on_cuda = str(device).startswith("cuda")
        dtype = torch.bfloat16 if on_cuda and self.family != "full" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
        return model.to(device)

    def build(self, base_model: torch.nn.Module, cfg) -> torch.nn.Module:
        """Wrap (or unfreeze) ``base_model`` into the trainable model of this method.

        Returns:
            ``spiel.SpielModel`` (SpIEL), ``peft.PeftModel`` (LoRA, (IA)3, SHiRA) or the model itself
            with every parameter trainable (full).
        """
        base_model.config.use_cache = False
        if self.family == "spiel":
            from spiel.model import get_spiel_model

            if self.quantized:
                from peft import prepare_model_for_kbit_training

                base_model = prepare_model_for_kbit_training(
                    base_model, use_gradient_checkpointing=cfg.gradient_checkpointing)
            return get_spiel_model(base_model, self.spiel_config(cfg))
        if self.family == "lora":
            from baselines.lora import build_lora_model

            return build_lora_model(base_model, cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
        if self.family == "ia3":
            from baselines.ia3 import build_ia3_model

            return build_ia3_model(base_model)
        if self.family == "shira":
            from baselines.shira import build_shira_model

            return build_shira_model(base_model, cfg.rank, seed=cfg.seed)
        if self.family == "full":
            from baselines.full import build_full_model

            return build_full_model(base_model)
        raise AssertionError(self.family)

    def build_optimizer(self, model: torch.nn.Module, cfg, learning_rate: float) -> torch.optim.Optimizer:
        """The optimizer of this method for ``model`` (built by :meth:`build`).

        SpIEL: ``spiel.build_optimizer`` (SparseAdamW for AG, SM3 for MA), eps 1e-8 as under HF Trainer
        in the reference. Full FT: AdamW with decay on matrices only. Other methods: AdamW over the
        trainable parameters.
        """
        if self.family == "spiel":
            from spiel.optim import build_optimizer

            return build_optimizer(model, lr=learning_rate, weight_decay=cfg.weight_decay,
                                         betas=(0.9, 0.999), eps=1e-8)
        if self.family == "full":
            from baselines.full import decay_parameter_groups

            groups = decay_parameter_groups(model, cfg.weight_decay)
        else:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)

    def save(self, model: torch.nn.Module, directory: str | Path, tokenizer=None) -> None:
        """Save the trained adapter in the method's own format (the whole model folder for full FT).

        SpIEL: ``SpielModel.save_pretrained`` (values + indices + config); peft methods:
        ``adapter_model.safetensors`` + ``adapter_config.json``; full: ``save_pretrained`` of the model
        plus the tokenizer, so the folder is a complete model.
        """
        directory = Path(directory)
        model.save_pretrained(str(directory))
        if self.family == "full" and tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        (directory / "method.json").write_text(json.dumps({"method": self.name, "family": self.family}) + "\n")


def _spec(name, family, lr, description, label, order, quantized=False, algorithm=None, policy=None,
          **facts) -> MethodSpec:
    return MethodSpec(name=name, family=family, quantized=quantized, default_learning_rate=lr,
                      description=description, selection_algorithm=algorithm, reselection_rate_policy=policy,
                      label=label, order=order, **facts)


#: Every name the suite knows, trainable or not: the one home of labels, table order, 4-bit twins,
#: LoRA references and benchmark entries (``spielbench.aggregate``, ``spielbench.figures`` read them here).
REGISTRY: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        _spec("spiel-ag", "spiel", 1e-3, "SpIEL, accumulated-gradient growth", "SpIEL-AG", 30,
              algorithm="ag", policy="linear", color="#d62728"),
        _spec("spiel-ma", "spiel", 2e-3, "SpIEL, momentum-approximation growth (SM3)", "SpIEL-MA", 40,
              algorithm="ma", policy="linear", color="#ff7f0e"),
        _spec("spiel-static", "spiel", 1e-3, "SpIEL without reselection (fixed random indices)",
              "SpIEL static mask (ablation)", 60, algorithm="ag", policy="none", color="#8c564b"),
        _spec("qspiel-ag", "spiel", 1e-3, "SpIEL-AG on an NF4 base", "qSpIEL-AG", 90, quantized=True,
              algorithm="ag", policy="linear", fp32_twin="spiel-ag", lora_reference="qlora"),
        _spec("qspiel-ma", "spiel", 2e-3, "SpIEL-MA on an NF4 base", "qSpIEL-MA", 100, quantized=True,
              algorithm="ma", policy="linear", fp32_twin="spiel-ma", lora_reference="qlora"),
        _spec("lora", "lora", 1e-3, "LoRA (peft), all seven projections", "LoRA", 10, color="#1f77b4"),
        _spec("qlora", "lora", 1e-3, "LoRA on an NF4 base (qLoRA)", "qLoRA", 80, quantized=True,
              fp32_twin="lora", lora_reference="qlora"),
        _spec("ia3", "ia3", 3e-3, "(IA)3 (peft)", "(IA)3", 20, color="#9467bd"),
        _spec("shira", "shira", 1e-3, "SHiRA (peft): static random sparse at LoRA's budget", "SHiRA (ablation)", 70,
              color="#e377c2"),
        _spec("full", "full", 2e-5, "full fine-tuning", "Full FT", 50, color="#2ca02c"),
        _spec("base", "base", None, "the base model, not fine-tuned (evaluation only)", "Base model", 0,
              benchmark=False, trainable=False, color="#000000"),
        _spec("floor", "floor", None, "frozen weights, gradient to the inputs only (benchmark only)",
              "Floor (frozen weights)", 110, trainable=False, color="#7f7f7f"),
        _spec("lora-dropout0", "lora", None, "LoRA without dropout, the fastest LoRA (benchmark only)",
              "LoRA (dropout 0)", 12, trainable=False),
        _spec("spiel-reference", "spiel", None, "SpIEL-AG with the reference-style layer (benchmark only)",
              "SpIEL (reference-style layer)", 120, algorithm="ag", policy="linear", trainable=False,
              color="#bcbd22"),
    )
}

#: Every method a run config may name (the trainable entries of :data:`REGISTRY`), by name.
METHODS: dict[str, MethodSpec] = {name: s for name, s in REGISTRY.items() if s.trainable}


def method_label(name: str) -> str:
    """Display name of a registry entry (the name itself when it is not registered)."""
    spec = REGISTRY.get(name)
    return spec.label if spec is not None else name


def table_order(name: str) -> tuple[float, str]:
    """Sort key of a method name in tables: (registry ``order``, name); unregistered names sort last."""
    spec = REGISTRY.get(name)
    return (spec.order if spec is not None else math.inf, name)


def fp32_twin(name: str) -> str | None:
    """The fp32 method a 4-bit method is compared with at the same rank (None for fp32 or unknown names)."""
    spec = REGISTRY.get(name)
    return spec.fp32_twin if spec is not None else None


def method_color(name: str) -> str:
    """Line colour of a method in figures: its own, or its fp32 twin's for a 4-bit method (a fixed cyan
    for unregistered names)."""
    spec = REGISTRY.get(name)
    if spec is None:
        return MethodSpec.color
    return REGISTRY[spec.fp32_twin].color if spec.fp32_twin in REGISTRY else spec.color


def is_quantized(name: str) -> bool:
    """Whether ``name`` is a registered 4-bit (NF4 base) method."""
    spec = REGISTRY.get(name)
    return spec is not None and spec.quantized


def lora_reference(name: str) -> str:
    """The method whose step time and memory ``name``'s are divided by at the same rank ("lora" when unknown)."""
    spec = REGISTRY.get(name)
    return spec.lora_reference if spec is not None else "lora"


def benchmark_methods() -> tuple[str, ...]:
    """Every entry the efficiency benchmark has, in table order."""
    return tuple(sorted((n for n, s in REGISTRY.items() if s.benchmark), key=table_order))


def ranked_methods() -> tuple[str, ...]:
    """The trainable methods whose budget is a LoRA rank (:attr:`MethodSpec.takes_rank`), in table order."""
    return tuple(sorted((n for n, s in METHODS.items() if s.takes_rank), key=table_order))


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` called ``name``.

    Raises:
        InputError: unknown name (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"method: unknown method {name!r}; known methods: {', '.join(METHODS)}") from None
