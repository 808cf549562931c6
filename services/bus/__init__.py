"""The shared contract between services: typed events and commands, the wire, pub/sub
through the hub (``pubsub``) with replay (``replay``), request/reply (``rpc``), CURVE keys,
the service base, backoff and log throttling (``retry``)."""

from .config import BusSettings
from .envelope import Envelope
from . import refusals
from .errors import BusError, DecodeError, GridtradeError, RequestError
from .refusals import Refusal, RequestTimeout
from .keys import Security, ensure_keys
from .service import Service, configure_logging, run_service
from .store import Store
from .pubsub import Publisher, Subscriber
from .rpc import Caller, RpcClient, RpcServer

__all__ = [
    "BusError", "BusSettings", "Caller", "DecodeError", "Envelope", "GridtradeError", "Publisher", "Refusal", "RequestError",
    "RequestTimeout", "RpcClient", "RpcServer", "Security", "Service", "Store", "Subscriber",
    "configure_logging", "ensure_keys", "refusals", "run_service",
]
