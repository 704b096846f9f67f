"""The YAML files of a plan: one federation file and one file per organisation."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..model import LoraTarget, ModelConfig

NonEmpty = Annotated[str, Field(min_length=1, max_length=4096)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Selectors = Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=1024)]
Rate = Annotated[float, Field(ge=0, lt=1)]

# Bounds on the numbers of a plan, far beyond any real run, so that a typo or a hostile file is
# an error at check time rather than an allocation or a loop that never ends.
MAX_STEPS = 1 << 30
MAX_SEQUENCES = 1 << 20  # a batch's sequences; its tokens: batch_size x seq_len
MAX_SEQ_LEN = 1 << 20
MAX_SEED = (1 << 32) - 1  # what numpy and every other seeded library accepts
DAY_S = 86_400.0
MAX_ORGS = 1024


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"\[[0-9A-Fa-f:.]+\]|{_LABEL}(\.{_LABEL})*")


def host_port(address: str, default_host: str | None = None) -> tuple[str, int]:
    """The host and port of a ``HOST:PORT`` address (an IPv6 host in brackets; with
    ``default_host``, the host may be left out: ``:9092``). ValueError if it is not one."""
    host, sep, port = address.rpartition(":")
    if not host and default_host is not None:
        host = default_host
    if not (sep and re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536 and _HOST.fullmatch(host)):
        raise ValueError(
            f"expected HOST:PORT with a port from 1 to 65535 (e.g. 'hospital-a.example.org:50051' or "
            f"'[::1]:50051'), got {address[:100]!r}"
        )
    return host.strip("[]"), int(port)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ScheduleConfig(_Strict):
    """The learning rate as a function of the global step (rounds x steps per round): a linear
    warmup from lr / warmup_steps to lr, then held (constant) or decayed to min_lr_ratio x lr
    over decay_steps (default: the rest of the run), linearly or along a half cosine."""

    warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS, description="steps of linear warmup")
    decay: Literal["constant", "linear", "cosine"] = "constant"
    decay_steps: int | None = Field(
        default=None, gt=0, le=MAX_STEPS, description="steps of decay after the warmup (default: the rest)"
    )
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="the decay's end, as a fraction of lr")


class OptimizerConfig(_Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(default=3e-4, gt=0, le=10)
    betas: tuple[Rate, Rate] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    schedule: ScheduleConfig | None = Field(default=None, description="default: lr at every step")


class TrainingConfig(_Strict):
    rounds: int = Field(default=1, gt=0, le=1 << 20)
    steps_per_round: int = Field(default=10, gt=0, le=1 << 20)
    batch_size: int = Field(default=8, gt=0, le=MAX_SEQUENCES)
    seq_len: int = Field(default=64, gt=1, le=MAX_SEQ_LEN)
    micro_batches: int = Field(default=1, gt=0, le=MAX_SEQUENCES)
    schedule: Literal["gpipe", "1f1b", "sequential"] = Field(
        default="1f1b", description="how a data owner's micro-batches are in flight across organisations"
    )
    max_in_flight: int = Field(
        default=0, ge=0, le=MAX_SEQUENCES, description="micro-batches in flight at once; 0 = one per stage of the path"
    )
    optimizer: OptimizerConfig = OptimizerConfig()
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    eval_tokens: int = Field(
        default=4096,
        ge=0,
        le=1 << 40,
        description=(
            "held-out tokens evaluated per data owner each round (whole batches of batch_size x seq_len, "
            "at least one); 0: no evaluation"
        ),
    )
    precision: Literal["fp32", "bf16-mixed"] = Field(
        default="fp32",
        description=(
            "bf16-mixed: fp32 master weights and optimizer state, forward and backward in bf16 (activations "
            "and gradients cross organisations in bf16); norms, softmaxes, the router and the loss in fp32"
        ),
    )
    grad_clip: float | None = Field(
        default=None,
        gt=0,
        le=1e6,
        description="clip the whole model's gradient to this L2 norm before every step (all organisations together)",
    )
    activation_checkpointing: bool = Field(
        default=False,
        description=(
            "blocks (and the loss, in row chunks) recompute their forward during backward instead of keeping "
            "activations; an organisation's own file may turn it on or off for itself"
        ),
    )
    deterministic: bool = Field(
        default=False,
        description=(
            "add up the gradients that several data owners' batches leave on a partition in data-owner order, "
            "not in the order their backwards arrive, so that a run repeats bitwise; costs one gradient buffer "
            "per extra data owner on such partitions"
        ),
    )

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batches ({self.micro_batches})"
            )
        schedule = self.optimizer.schedule
        if schedule is not None and schedule.warmup_steps > self.total_steps:
            raise ValueError(
                f"optimizer.schedule.warmup_steps ({schedule.warmup_steps}) is beyond the run: it has "
                f"{self.total_steps} steps ({self.rounds} rounds x {self.steps_per_round} steps)"
            )
        return self


class AggregationConfig(_Strict):
    strategy: Literal["fedavg", "fedprox", "fedadam", "diloco"] = "fedavg"
    proximal_mu: float = Field(
        default=0.0,
        ge=0,
        le=1e6,
        description="FedProx: weight of mu/2 |w - w_round|^2 in each organisation's objective",
    )
    server_lr: float = Field(default=1e-2, gt=0, le=10, description="FedAdam: the server's step size (eta)")
    server_betas: tuple[Rate, Rate] = Field(default=(0.9, 0.99), description="FedAdam: the server's moment decay rates")
    server_tau: float = Field(
        default=1e-3, gt=0, le=1, description="FedAdam: adaptivity (epsilon of the server's Adam)"
    )
    outer_lr: float = Field(
        default=0.7,
        gt=0,
        le=10,
        description="DiLoCo: step size of the outer SGD on each replica group's averaged round update",
    )
    outer_momentum: float = Field(
        default=0.9, ge=0, lt=1, description="DiLoCo: momentum of the outer SGD (0: plain averaging scaled by outer_lr)"
    )
    nesterov: bool = Field(default=True, description="DiLoCo: Nesterov momentum in the outer SGD")
    replica_sync: Literal["round", "step"] = Field(
        default="round",
        description=(
            "round: each replica trains on the batches it serves and replicas are averaged after the round; "
            "step: replica holders add up their gradients before every optimizer step (FedSGD within the "
            "replica group), "
            "so replicas stay identical and training equals centralised training, at the cost of exchanging "
            "the replicated pieces' gradients every step"
        ),
    )

    @model_validator(mode="after")
    def _one_way_to_keep_replicas(self) -> AggregationConfig:
        if self.replica_sync == "step" and self.strategy in ("fedadam", "diloco"):
            raise ValueError(
                f"replica_sync: step keeps replicas identical and equal to centralised training; strategy "
                f"{self.strategy} would step them again after each round: use strategy fedavg with replica_sync "
                f"step, or {self.strategy} with replica_sync round"
            )
        return self


Codec = Literal["none", "bf16", "fp16", "int8"]


class CompressionConfig(_Strict):
    """Wire codec per tensor role. Lossy codecs change the maths: split training then no longer
    equals monolithic training exactly, and ``fedsplit verify`` shows by how much."""

    activations: Codec = "none"
    gradients: Codec = "none"


class TransportConfig(_Strict):
    compression: CompressionConfig = CompressionConfig()
    timeout_s: float = Field(default=60.0, gt=0, le=DAY_S, description="deadline of one data-plane call")
    retries: int = Field(
        default=2, ge=0, le=100, description="retries of a call whose peer was unreachable (UNAVAILABLE)"
    )
    max_tensor_mib: int = Field(default=1024, gt=0, le=1 << 20, description="largest tensor a worker accepts")
    shared_memory: bool = Field(default=False, description="move tensors through /dev/shm between workers on one host")
    step_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=DAY_S,
        description=(
            "longest a worker waits for the other data owners to finish a step, or for an organisation to begin a round"
        ),
    )


class DataConfig(_Strict):
    train: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4096)] | None = None
    eval: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4096)] | None = None


class OrgFile(_Strict):
    org: Name
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d{1,3})?|mps)$")
    data: DataConfig | None = None
    holds: Selectors = []
    local: Selectors = Field(default=[], description="held selectors that are never averaged")
    owns: Selectors = Field(
        default=[],
        description=(
            "routed experts (layers.A-B.experts.E-F) trained on this data owner's batches only: no other data "
            "owner's tokens are routed to them; held by one organisation (this one, or a host whose holds name "
            "them), never averaged"
        ),
    )
    withdraw_experts: bool = Field(
        default=False,
        description="leave this organisation's owned experts out of every exported model (as export --without)",
    )
    task: str | None = Field(
        default=None,
        description=(
            "a task of the federation's 'tasks' that this data owner's data trains (its .jsonl lines carry "
            "'text' and 'label'), instead of next-token prediction"
        ),
    )
    address: str | None = Field(default=None, description="data-plane HOST:PORT, for deployment")
    activation_checkpointing: bool | None = Field(
        default=None, description="this organisation's own choice (default: the federation's training setting)"
    )

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host_port(value)
        return value


TaskName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]
LabelName = Annotated[str, Field(min_length=1, max_length=256)]


class TaskConfig(_Strict):
    """A sequence-classification task on the shared trunk: the head ``tasks.NAME`` (a unit a plan
    places like any other) scores each sequence's last token over ``labels``; the data owners whose
    file names the task train it. A step's objective is the mean over data owners of each one's
    loss times its weight: 1 for next-token prediction, ``weight`` for this task."""

    labels: list[LabelName] = Field(min_length=2, max_length=1 << 16)
    weight: float = Field(default=1.0, gt=0, le=1e3)

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str]) -> list[str]:
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"labels must be distinct: {', '.join(repeated)} repeated")
        return labels


class FinetuneConfig(_Strict):
    """Fine-tuning with low-rank adapters over a frozen base: the base's weights get no gradient
    and no optimizer state; the adapters (and the pieces ``train`` names) train."""

    method: Literal["lora"] = "lora"
    rank: int = Field(default=8, gt=0, le=1 << 16)
    alpha: float = Field(default=16.0, gt=0, le=1 << 16)
    dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="of each adapter's input in training (PEFT's lora_dropout), masks seeded per micro-batch",
    )
    targets: list[LoraTarget] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "experts"],
        min_length=1,
        description="the linear maps that get adapters; experts: w1, w2, w3 of every routed expert",
    )
    train: Selectors = Field(default=[], description="selectors trained fully, besides the adapters (e.g. routers)")
    base_dtype: Literal["fp32", "bf16"] | None = Field(
        default=None, description="the frozen base's storage: the run's compute precision (bf16 with bf16-mixed)"
    )


class ActivationNoise(_Strict):
    """Per-token clipping and Gaussian noise on the hidden states a data owner sends out."""

    clip: float = Field(gt=0, le=1e6, description="the L2 norm each token's hidden state is clipped to")
    noise_multiplier: float = Field(
        default=0.0,
        ge=0,
        le=1e3,
        description="the noise's standard deviation over clip (0: clipping alone, which guarantees nothing)",
    )


class GradientNoise(ActivationNoise):
    """Per-token clipping and Gaussian noise on the gradients a data owner returns: of the hidden
    states it received from the organisation before it on its path."""

    clip: float = Field(gt=0, le=1e6, description="the L2 norm each token's returned gradient is clipped to")


class PrivacyConfig(_Strict):
    """Defences a data owner applies before its bytes leave it, and the δ its ε is reported at."""

    activations: ActivationNoise | None = Field(
        default=None, description="at every cut of a data owner's path: its hidden states, clipped and noised"
    )
    gradients: GradientNoise | None = Field(
        default=None,
        description="where a data owner's path comes back to it: the gradients it returns, clipped and noised",
    )
    delta: float = Field(default=1e-5, gt=0, lt=1, description="the δ at which ε is reported")


class FederationFile(_Strict):
    name: Name
    model: NonEmpty | ModelConfig = Field(
        description=(
            "relative to this file: a model YAML (seeded initial weights), or a Hugging Face or fedsplit model "
            "directory to start from its weights; or the model's fields inline"
        ),
    )
    tokenizer: str | None = Field(
        default=None,
        description=("a tokenizer file (`fedsplit tokenizer train`), relative to this file; default: UTF-8 bytes"),
    )
    training: TrainingConfig = TrainingConfig()
    aggregation: AggregationConfig = AggregationConfig()
    transport: TransportConfig = TransportConfig()
    orgs: list[NonEmpty | OrgFile] = Field(
        min_length=1,
        max_length=MAX_ORGS,
        description="org files or globs, relative to this file, or organisations written inline",
    )
    finetune: FinetuneConfig | None = Field(default=None, description="LoRA over a frozen base (default: train all)")
    freeze: Selectors = Field(default=[], description="selectors whose pieces do not train (no gradient, no state)")
    privacy: PrivacyConfig | None = Field(default=None, description="noise on what data owners send (default: none)")
    tasks: dict[TaskName, TaskConfig] = Field(
        default={}, max_length=256, description="classification heads on the trunk, by name (default: none)"
    )
