"""Typed keys for the objects the application shares between its handlers."""

from __future__ import annotations

from aiohttp import web

from .access import AccessLog
from .accounting import Accounting
from .admission import Admission
from .alerts import Alerts
from .books import Books
from .budgets import Budgets
from .cache import AnswerCache
from .config import Config
from .limits import WindowStore
from .metrics import Metrics
from .sessions import Sessions
from .ledger import LedgerStore
from .tokens import Estimator
from .upstream import UpstreamClient

CONFIG = web.AppKey("config", Config)
ACCOUNTING = web.AppKey("accounting", Accounting)
LEDGER = web.AppKey("ledger", LedgerStore)
ESTIMATOR = web.AppKey("estimator", Estimator)
LIMITER = web.AppKey("limiter", WindowStore)
ADMISSION = web.AppKey("admission", Admission)
METRICS = web.AppKey("metrics", Metrics)
ALERTS = web.AppKey("alerts", Alerts)
UPSTREAMS = web.AppKey("upstreams", dict[str, UpstreamClient])
SESSIONS = web.AppKey("sessions", Sessions)
BOOKS = web.AppKey("books", Books)
CACHE = web.AppKey("cache", AnswerCache)
BUDGETS = web.AppKey("budgets", Budgets)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
