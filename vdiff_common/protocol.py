"""Wire protocol between gateways and workers: the only place message shapes are defined.

Each message goes one way, and each side decodes only the union of what it may receive: a
message of the other direction fails to decode there, and is counted and dropped like any
other bad frame."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec

PROTOCOL_VERSION = 3  # 2: Tokenize / Tokens; 3: Generate.stream, the answer's tail in Done

FinishReason = Literal["stop", "length"]
ModelKind = Literal["llada", "dream", "ar", "diffusion_gemma", "llada2"]
# The decoding strategies by name; which models each decodes is vdiff_worker.decoding's table.
Decoding = Literal["reference", "threshold", "factor", "apd", "editing"]
DECODINGS: tuple[Decoding, ...] = get_args(Decoding)
Cache = Literal["none", "prefix", "dual"]
Remasking = Literal["low_confidence", "random"]
DreamAlg = Literal["origin", "maskgit_plus", "topk_margin", "entropy"]

NonNeg = Annotated[float, msgspec.Meta(ge=0.0)]
Prob = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
# Upper bounds keep every integer inside what the wire format and a tensor index can hold.
PosInt = Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
Seed = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]


class Load(msgspec.Struct, frozen=True):
    running: int = 0
    waiting: int = 0
    free_slots: int = 0
    steps_per_s: float = 0.0
    tokens_per_forward: float = 0.0
    batch_mean: float = 0.0
    batch_max: int = 0
    model_calls: int = 0  # calls into the model since the worker started
    model_rows: int = 0  # rows (sequences) those calls carried
    aborted: int = 0  # requests aborted while queued or running, since the worker started


class ModelInfo(msgspec.Struct, frozen=True):
    name: str
    max_model_len: int
    kind: ModelKind = "llada"


class Register(msgspec.Struct, tag=True):
    version: int
    worker_id: str
    models: list[ModelInfo]
    capacity: int
    load: Load = Load()


class Welcome(msgspec.Struct, tag=True):
    gateway_id: str
    accepted: bool
    reason: str = ""


class Heartbeat(msgspec.Struct, tag=True):
    sender_id: str
    load: Load = Load()


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """OpenAI sampling fields plus diffusion fields; None means "the worker's default".

    Each field a request sends to the worker is declared here once, with its bounds: the
    gateway's HTTP schemas inherit these fields (vdiff_api.schemas), the gateway copies them
    over by name, and each strategy names the ones it reads (any other one set is refused).
    """

    max_tokens: PosInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    # None: the sampler's own default (off; 50 for Dream's)
    top_k: Annotated[int, msgspec.Meta(ge=-1, lt=1 << 31)] | None = None
    seed: Seed | None = None
    stop: list[str] = []
    stop_token_ids: list[TokenId] = []
    decoding: Decoding | None = None
    diffusion_steps: PosInt | None = None
    block_length: PosInt | None = None
    remasking: Remasking | None = None
    threshold: Prob | None = None
    factor: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    cache: Cache | None = None
    cfg_scale: NonNeg = 0.0
    alg: DreamAlg | None = None
    alg_temp: NonNeg | None = None
    apd_mixture_weight: Prob | None = None
    apd_kv_window: PosInt | None = None
    apd_max_lookahead: PosInt | None = None
    # LLaDA2.1's editing rule: the confidence at which a committed token is replaced, the
    # passes allowed after a block's last mask, the masks committed per pass at least.
    editing_threshold: Prob | None = None
    max_post_steps: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] | None = None
    num_to_transfer: PosInt | None = None
    eos_early_stop: bool = True


class Generate(msgspec.Struct, tag=True):
    """A job: prompt (text, chat messages or token ids); `n` choices share it. Without
    `stream` the worker sends no Chunks: each choice's whole answer rides in its Done."""

    request_id: str
    model: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None  # role, content: as chat templates take them
    params: SamplingParams = SamplingParams()
    n: int = 1
    stream: bool = True


class Abort(msgspec.Struct, tag=True):
    request_id: str


class Chunk(msgspec.Struct, tag=True):
    """Newly committed text of choice `index`, contiguous from the left of the answer."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]


class Done(msgspec.Struct, tag=True):
    """Choice `index` is finished; `text`/`token_ids` are the part of it no Chunk carried."""

    request_id: str
    index: int
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    forward_passes: int
    worker_s: float = 0.0  # job arrival in the worker to this message
    text: str = ""
    token_ids: list[int] = []


class Error(msgspec.Struct, tag=True):
    request_id: str
    status: int
    message: str
    param: str | None = None


class Goodbye(msgspec.Struct, tag=True):
    sender_id: str


class Tokenize(msgspec.Struct, tag=True):
    """One-shot: the ids of `prompt` or chat `messages`, or the text of `tokens`."""

    request_id: str
    model: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None  # role, content: as chat templates take them
    tokens: list[int] | None = None


class Tokens(msgspec.Struct, tag=True):
    """The answer to Tokenize (or an Error with its request_id)."""

    request_id: str
    tokens: list[int] = []
    text: str = ""


ToWorker = Welcome | Heartbeat | Generate | Abort | Tokenize  # what a gateway sends
ToGateway = Register | Heartbeat | Chunk | Done | Error | Goodbye | Tokens  # a worker sends
Message = ToWorker | ToGateway

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_to_gateway = msgspec.msgpack.Decoder(ToGateway)
_either = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


# Each raises msgspec.DecodeError (or ValidationError) on a bad frame or one going the other way.
def decode_for_worker(frame: bytes) -> ToWorker:
    return _to_worker.decode(frame)


def decode_for_gateway(frame: bytes) -> ToGateway:
    return _to_gateway.decode(frame)


def decode(frame: bytes) -> Message:
    """Either direction: for tools that stand in for one side (bench/reliability.py's
    hostile worker); the gateway and the worker decode only their own union."""
    return _either.decode(frame)
