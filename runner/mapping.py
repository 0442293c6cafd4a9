"""Mapping: a handled response's records, selected by `records`, kept by `filter`, shaped by
`fields` (or a compiled shape), reshaped by `add_fields`, `drop_fields` and `rename_keys`,
thinned by `skip_seen`, then emitted and kept for `steps.<id>.records`."""

from __future__ import annotations

from typing import Any

from .context import NO_PAGE, Context, Page, RunState
from .errors import RunError
from .incremental import SeenFilter
from .model import FieldSpec, StepSpec
from .paginate import Pagination


class Mapper:
    """Selects and delivers the records of a run's pages."""

    __slots__ = ("reports", "seen", "state")

    def __init__(self, state: RunState, seen: dict[str, SeenFilter] | None = None) -> None:
        self.state = state
        self.reports = state.reports
        # Streams with `cursor.skip_seen`.
        self.seen = seen if seen is not None else {}

    def select(self, step: StepSpec, rscope: dict[str, Any], pager: Pagination) -> Page:
        """What `records` selects from an ok response (the next page may be requested before
        these are mapped)."""
        report = self.reports[step.id]
        report.ok_responses += 1
        if step.records is None:
            return NO_PAGE
        selected = step.records.search(rscope)
        if selected is None:
            return NO_PAGE
        report.ok_with_records += 1
        records = selected if isinstance(selected, list) else [selected]
        if step.paginate is not None and pager.repeats(records):
            return Page(0, None, rscope, repeated=True)
        return Page(len(records), records, rscope)

    def deliver(self, step: StepSpec, ctx: Context, page: Page) -> None:
        """Filter, shape and emit a page's records; keep them for `steps.<id>.records`."""
        records = page.records
        if records is None:
            return
        if step.filter is not None:
            keep = step.filter.holds
            if step.filter.is_template:
                records = [r for r in records if keep(_with_record(page.rscope, r))]
            else:
                records = [r for r in records if keep(r)]
        if step.shape is not None:
            records = [step.shape(record) for record in records]
        elif step.fields is not None:
            assert page.rscope is not None
            records = shape(step.fields, records, page.rscope)
        if step.reshape is not None:
            reshape, rscope = step.reshape, page.rscope or {}
            records = [reshape(r if isinstance(r, dict) else {"value": r}, rscope) for r in records]
        if step.emit:
            seen = self.seen.get(step.emit)
            if seen is not None:
                # Before steps.<id>.records and the writers: a dropped record is not there.
                records = [r for r in records if seen.keep(r)]
        self.reports[step.id].records += len(records)
        if step.emit:
            if step.fields is None and step.reshape is None:
                records = [r if isinstance(r, dict) else {"value": r} for r in records]
            if self.state.writes(step):
                ctx.sink.emit_many(step.emit, records)
        if step.referenced:
            report = self.reports[step.id]
            report.kept += len(records)
            if step.max_records is not None and report.kept > step.max_records:
                raise RunError(
                    f"step '{step.id}' has more than max_records ({step.max_records}) records "
                    f"to keep for steps.{step.id}.records, which an expression reads: raise "
                    "max_records on the step (null lifts it), or narrow what it fetches",
                    kind="limit",
                )
            ctx.sink.step_records(step.id, records)
            local = self.state.keep_local(ctx, step.id)
            if local is not None:
                local["records"].extend(records)


def shape(
    fields: tuple[FieldSpec, ...], records: list[Any], rscope: dict[str, Any]
) -> list[dict[str, Any]]:
    """Fields with templates: each record in a scope of its own (`record`)."""
    out = []
    for record in records:
        tscope = dict(rscope)
        tscope["record"] = record
        out.append({f.name: field_value(f, record, tscope) for f in fields})
    return out


def _with_record(rscope: dict[str, Any] | None, record: Any) -> dict[str, Any]:
    scope = dict(rscope or {})
    scope["record"] = record
    return scope


def field_value(spec: FieldSpec, data: Any, scope: dict[str, Any]) -> Any:
    """A field: its expression read from `data`, or its template rendered in `scope`."""
    if spec.expression is not None:
        return spec.expression.search(data)
    assert spec.template is not None
    return spec.template.render(scope)
