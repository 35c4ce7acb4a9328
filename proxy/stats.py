"""What /stats says: the seed's JSON contract, its WhatsApp text, and the metrics.json snapshot.

The seed's keys and value formats are a contract: its users' scripts parse them
(`float(stats['rate_limits']['uso_tpm'].replace('%', ''))`, `stats['tokens']['total']`), so
they are produced here exactly, and everything richer goes under `detail` beside them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .accounting import Accounting, Aggregates, Tally
from .budgets import Budgets
from .cache import AnswerCache
from .ledger import OTHERS, SUCCESSES
from .config import Config, Upstream
from .errors import OUTCOMES, REFUSED_OUTCOMES
from .limits import WindowStore

_TEXT = {
    "es": {
        "title": "📊 **ESTADÍSTICAS DE {title}**",
        "state": "🟢 **Estado:** ✅ Operativo",
        "stopped": "🔴 **Estado:** ⏹️ Detenido (datos del registro)",
        "uptime": "⏰ **Uptime:** {uptime}",
        "plan": "🆓 **Plan:** {plan}",
        "usage": "📈 **Uso General:**",
        "requests": "• Total requests: {n}",
        "errors": "• Errores: {n}",
        "success": "• Tasa de éxito: {pct}",
        "latency": "• Tiempo promedio: {avg}",
        "tokens": "🤖 **Tokens Consumidos:**",
        "total": "• **Total**: {n}",
        "estimated": "• Estimados (sin dato del proveedor): ~{n}",
        "cache": "💾 Ahorro por caché: {tokens} tokens, ${usd}, {hits} requests",
        "limits": "📊 **Rate Limits ({label}):**",
        "tpm": "• Tokens/Minuto: {used} / {limit} TPM ({pct})",
        "rpd": "• Requests/Día: {used} / {limit} RPD ({pct})",
        "types": "📋 **Requests por Tipo:**",
        "last": "🕐 **Último request:** {ts}",
        "never": "ninguno todavía",
        "note": "💡 **Nota:** Todo el uso es gratuito dentro de los límites del Free Tier",
    },
    "en": {
        "title": "📊 **{title} STATISTICS**",
        "state": "🟢 **Status:** ✅ Operational",
        "stopped": "🔴 **Status:** ⏹️ Stopped (figures from the ledger)",
        "uptime": "⏰ **Uptime:** {uptime}",
        "plan": "🆓 **Plan:** {plan}",
        "usage": "📈 **Overall Usage:**",
        "requests": "• Total requests: {n}",
        "errors": "• Errors: {n}",
        "success": "• Success rate: {pct}",
        "latency": "• Average time: {avg}",
        "tokens": "🤖 **Tokens Used:**",
        "total": "• **Total**: {n}",
        "estimated": "• Estimated (not reported by the provider): ~{n}",
        "cache": "💾 Cache savings: {tokens} tokens, ${usd}, {hits} requests",
        "limits": "📊 **Rate Limits ({label}):**",
        "tpm": "• Tokens/Minute: {used} / {limit} TPM ({pct})",
        "rpd": "• Requests/Day: {used} / {limit} RPD ({pct})",
        "types": "📋 **Requests by Type:**",
        "last": "🕐 **Last request:** {ts}",
        "never": "none yet",
        "note": "💡 **Note:** All usage is free within the Free Tier limits",
    },
}
LANGS = tuple(_TEXT)


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_pct(value: float) -> str:
    return f"{value:.1f}%"


def fmt_uptime(seconds: float) -> str:
    minutes = max(0, int(seconds // 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    return f"{days}d {hours}h {minutes}m"


def fmt_time(config: Config, ts: float | None) -> str | None:
    """Local time without offset or fraction, as the seed shows it: 2024-01-15T14:32:18."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, config.stats.tz).replace(tzinfo=None).isoformat(timespec="seconds")


def _success_rate(agg: Aggregates) -> float:
    t = agg.totals
    return 100.0 * (t.requests - t.errors) / t.requests if t.requests else 100.0


def limits_upstream(config: Config) -> Upstream | None:
    """The upstream whose free-tier limits the seed's `rate_limits` strings describe."""
    if config.stats.limits_upstream:
        return config.upstreams[config.stats.limits_upstream]
    return next((u for u in config.upstreams.values() if u.limits.any), None)


def rate_limits(config: Config, limiter: WindowStore) -> dict[str, Any]:
    """The seed's four strings, read from the limiter's own windows for the configured scope."""
    upstream = limits_upstream(config)
    if upstream is None:
        return {"tokens_pm": "0 / ∞ TPM", "requests_dia": "0 / ∞ RPD", "uso_tpm": "0.0%", "uso_rpd": "0.0%"}
    model = config.stats.limits_model or ""
    tokens_min, tpm = limiter.usage(upstream.name, model, "tokens_per_minute")
    requests_day, rpd = limiter.usage(upstream.name, model, "requests_per_day")
    return {
        "tokens_pm": f"{fmt_int(tokens_min)} / {fmt_int(tpm) if tpm else '∞'} TPM",
        "requests_dia": f"{fmt_int(requests_day)} / {fmt_int(rpd) if rpd else '∞'} RPD",
        "uso_tpm": fmt_pct(100.0 * tokens_min / tpm if tpm else 0.0),
        "uso_rpd": fmt_pct(100.0 * requests_day / rpd if rpd else 0.0),
    }


# Tables in /stats show their busiest entries; the rest are summed under OTHERS, so the reply
# stays small however many models and users clients name.
TOP = 100


def _top(table: dict[str, Tally], limit: int = TOP) -> list[tuple[str, Tally]]:
    ordered = sorted(table.items(), key=lambda kv: (-kv[1].requests, kv[0]))
    if len(ordered) <= limit:
        return ordered
    rest = Tally()
    for _, tally in ordered[limit:]:
        rest.merge(tally)
    return [*ordered[:limit], (OTHERS, rest)]


def _tallies(table: dict[str, Tally], limit: int = TOP) -> dict[str, Any]:
    return {k: v.as_dict() for k, v in _top(table, limit)}


def _refused(acc: Accounting, limiter: WindowStore) -> dict[str, int]:
    shared = limiter.refusals()
    return shared if shared is not None else dict(acc.refused)


def stats_json(config: Config, acc: Accounting, limiter: WindowStore, running: bool = True,
               cache: AnswerCache | None = None, budgets: Budgets | None = None) -> dict[str, Any]:
    """The seed's /stats; `running` is False when `tollgate stats` reads the ledger of a stopped server.
    `cache` adds this process's own cache figures to what the books say it saved."""
    now = acc.clock()
    agg = acc.current
    totals = agg.totals
    tokens: dict[str, int] = {name: agg.by_upstream.get(name, Tally()).total_tokens
                              for name in config.upstreams}
    tokens["total"] = totals.total_tokens
    by_type = {name: agg.by_type.get(name, Tally()).requests for name in config.types}
    by_type.update({name: t.requests for name, t in agg.by_type.items() if name not in by_type})
    # The most recent users first, as many as /stats shows of any table.
    users = sorted(agg.user_last_seen, key=lambda u: -agg.user_last_seen[u])[:TOP]
    return {
        "estado": "✅ Operativo" if running else "⏹️ Detenido",
        "inicio": fmt_time(config, agg.epoch_started),
        "uptime": fmt_uptime(now - agg.epoch_started),
        "total_requests": totals.requests,
        "tokens": tokens,
        "requests_por_tipo": by_type,
        "tier": config.stats.tier,
        "rate_limits": rate_limits(config, limiter),
        "errores": totals.errors,
        "tasa_exito": fmt_pct(_success_rate(agg)),
        "tiempo_promedio_respuesta": f"{agg.latency.mean:.2f}s",
        "ultimo_request": fmt_time(config, agg.last_request),
        "costo_estimado_usd": f"${totals.cost_usd:.4f}",
        "conversaciones": {
            "activas": len(acc.active_users(config.stats.active_window_s)),
            "total_mensajes": agg.chat_messages,
            "usuarios": users,
        },
        # Answers from the cache since the epoch began: each a request, none an upstream call.
        "cache": {
            "hits": agg.cache_hits, "saved_tokens": agg.saved_tokens, "saved_usd": round(agg.saved_usd, 6),
            "hit_share": round(agg.cache_hits / totals.requests, 4) if totals.requests else 0.0,
            **(cache.figures() if cache is not None else {}),
        },
        "detail": {
            "epoch_started": agg.epoch_started,
            "process_uptime": fmt_uptime(now - acc.process_started),
            "tokens": {
                "prompt": totals.prompt_tokens, "completion": totals.completion_tokens,
                "cached": totals.cached_tokens, "total": totals.total_tokens,
                "estimated": totals.estimated_tokens, "estimated_calls": totals.estimated_calls,
            },
            "by_upstream": {name: {"label": config.upstreams[name].label, **tally}
                            if name in config.upstreams else tally
                            for name, tally in _tallies(agg.by_upstream).items()},
            "by_model": _tallies(agg.by_model),
            "by_type": _tallies(agg.by_type),
            "by_user": _tallies(agg.by_user),
            "distinct_users": len(agg.by_user),
            "errors_by_kind": {k: v for k, v in agg.outcomes.items() if k not in SUCCESSES and k not in REFUSED_OUTCOMES},
            # Refused before any model was asked (no key, our limits, a path not forwarded, the
            # ledger full): not calls, not errors, not ledger rows; since the process started,
            # or, where processes share limits in Redis, the deployment's since Redis started.
            "refused": _refused(acc, limiter),
            "latency_s": agg.latency.summary(),
            "ttft_s": agg.ttft.summary(),
            "cost_usd_by_model": {m: round(t.cost_usd, 6) for m, t in _top(agg.by_model)},
            "fallbacks": dict(agg.fallbacks),
            "attempts_before_fallback": dict(agg.attempts),
            "cost_last_7_days_usd": round(acc.trend.last_week(now), 6),
            "cost_projection_month_usd": round(acc.trend.monthly(now), 4),
            "limits": limiter.report(),
            "budgets": budgets.report() if budgets is not None else [],
            # What the dashboard writes in words: the configured title, language and labels.
            "labels": {
                "title": config.stats.title, "lang": config.commands.lang,
                "upstreams": {name: u.label for name, u in config.upstreams.items()},
                "types": {name: {"es": t.label, "en": t.label_en} for name, t in config.types.items()},
                "outcomes": [o for o in OUTCOMES if o not in REFUSED_OUTCOMES],
            },
            "limits_store": limiter.state,
            # Rows not yet on disk, and rows given up (on_ledger_full = "serve"): the books' own state.
            "ledger": acc.ledger.health().as_dict() if acc.ledger is not None else None,
        },
    }


def stats_text(config: Config, acc: Accounting, limiter: WindowStore, lang: str = "es", running: bool = True) -> str:
    words = _TEXT.get(lang, _TEXT["es"])
    data = stats_json(config, acc, limiter)
    cached = data["cache"]
    agg = acc.current
    label_key = "label_en" if lang == "en" else "label"
    lines = [
        words["title"].format(title=config.stats.title.upper()), "",
        words["state"] if running else words["stopped"],
        words["uptime"].format(uptime=data["uptime"]),
        words["plan"].format(plan=config.stats.plan or config.stats.tier), "",
        words["usage"],
        words["requests"].format(n=fmt_int(data["total_requests"])),
        words["errors"].format(n=fmt_int(data["errores"])),
        words["success"].format(pct=data["tasa_exito"]),
        words["latency"].format(avg=data["tiempo_promedio_respuesta"]), "",
        words["tokens"],
    ]
    for name, upstream in config.upstreams.items():
        free = " 🆓" if upstream.free or upstream.limits.any else ""
        lines.append(f"• {upstream.label}: {fmt_int(data['tokens'][name])}{free}")
    lines.append(words["total"].format(n=fmt_int(data["tokens"]["total"])))
    if agg.totals.estimated_tokens:
        lines.append(words["estimated"].format(n=fmt_int(agg.totals.estimated_tokens)))
    limited = limits_upstream(config)
    if limited is not None:
        limits = data["rate_limits"]
        tpm_used, tpm_limit = limits["tokens_pm"].removesuffix(" TPM").split(" / ")
        rpd_used, rpd_limit = limits["requests_dia"].removesuffix(" RPD").split(" / ")
        lines += [
            "", words["limits"].format(label=config.stats.limits_label or limited.label),
            words["tpm"].format(used=tpm_used, limit=tpm_limit, pct=limits["uso_tpm"]),
            words["rpd"].format(used=rpd_used, limit=rpd_limit, pct=limits["uso_rpd"]),
        ]
    if config.cache.rules or cached["hits"]:
        lines += ["", words["cache"].format(tokens=fmt_int(cached["saved_tokens"]), usd=f"{cached['saved_usd']:.4f}",
                                            hits=fmt_int(cached["hits"]))]
    lines += ["", words["types"]]
    for name, count in data["requests_por_tipo"].items():
        request_type = config.types.get(name)
        label = getattr(request_type, label_key) if request_type else name
        lines.append(f"• {label}: {fmt_int(count)}")
    lines += ["", words["last"].format(ts=data["ultimo_request"] or words["never"]), "", words["note"]]
    return "\n".join(lines)


def snapshot(config: Config, acc: Accounting) -> dict[str, Any]:
    """metrics.json in the seed's own schema, derived from the ledger's aggregates."""
    agg = acc.current
    out: dict[str, Any] = {
        "inicio": fmt_time(config, agg.epoch_started),
        "total_requests": agg.totals.requests,
    }
    for name, upstream in config.upstreams.items():
        out[f"total_tokens_{upstream.short_name}"] = agg.by_upstream.get(name, Tally()).total_tokens
    out.update({
        "requests_por_tipo": {name: agg.by_type.get(name, Tally()).requests for name in config.types},
        "errores": agg.totals.errors,
        "tiempo_promedio_respuesta": round(agg.latency.mean, 2),
        "usuarios_unicos": len(agg.user_last_seen),
        "ultimo_request": fmt_time(config, agg.last_request),
    })
    return out
