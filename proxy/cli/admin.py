"""`memshift admin ...`: the operator's side of a migration, over the MigrationAdmin API.

    memshift admin start --to SPEC [--scopes a,b | --scope-prefix P | --scopes-from FILE] [--batch-size N]
                         [--rate-limit R] [--reembed] [--mirror-seconds S]
    memshift admin status [--watch]
    memshift admin placement
    memshift admin advance [--from PHASE]
    memshift admin route --read-fraction F [--shadow-rate R]
    memshift admin route --ramp [STEPS] [--interval S] [--shadow-rate R]
    memshift admin mismatches [--limit N] [--operation OP] [--scope S]
    memshift admin pause | resume
    memshift admin rollback --reason R
    memshift admin verify [--resume] [--repair]
    memshift admin history

The admin token comes from --token, $MEMSHIFT_ADMIN_TOKEN, or --token-file (default ./data/admin.token, which a
proxy without a configured token writes on first start).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc

from adapters.specs import read_secret_file
from memshift.v1 import admin_pb2 as pb
from memshift.v1 import admin_pb2_grpc as pb_grpc

PHASES = {"NotStarted": pb.NOT_STARTED, "DataMigration": pb.DATA_MIGRATION, "DualWrite": pb.DUAL_WRITE,
          "Completed": pb.COMPLETED, "RolledBack": pb.ROLLED_BACK}
PHASE_NAMES = {v: k for k, v in PHASES.items()}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = sub.add_parser("admin", help="drive a migration (MigrationAdmin API)", allow_abbrev=False)
    admin.add_argument("--admin-target", default=os.environ.get("MEMSHIFT_ADMIN_TARGET", "127.0.0.1:50052"))
    admin.add_argument("--token", default=os.environ.get("MEMSHIFT_ADMIN_TOKEN"))
    admin.add_argument("--token-file", default=os.environ.get("MEMSHIFT_ADMIN_TOKEN_FILE", "./data/admin.token"))
    admin.add_argument("--actor", default=os.environ.get("USER", "operator"), help="who acts, for the history")
    admin.add_argument("--tls-ca", default=os.environ.get("MEMSHIFT_ADMIN_TLS_CA"),
                       help="CA certificate (PEM) of an admin port serving TLS; unset: plain text")
    cmds = admin.add_subparsers(dest="admin_command", required=True)
    p = cmds.add_parser("start", help="start migrating to a new store", allow_abbrev=False)
    p.add_argument("--to", required=True, dest="target", help="store spec, e.g. sqlite:///./data/new.db")
    p.add_argument("--batch-size", type=int, default=500, help="records per batch, 1 to 10000")
    p.add_argument("--rate-limit", type=float, default=0.0, help="records per second (0: unlimited)")
    p.add_argument("--workers", type=int, default=1, help="batches applied at once, 1 to 16")
    p.add_argument("--reembed", action="store_true", help="re-embed even when the models match")
    p.add_argument("--mirror-seconds", type=float, default=3600.0, help="rollback window after cutover")
    p.add_argument("--require-verify", action="store_true")
    p.add_argument("--full-copy", action="store_true", help="copy everything even to a target rolled back from "
                   "(by default only what changed since is copied)")
    p.add_argument("--scopes", default="", help="move only these scopes, separated by commas (default: every scope "
                   "of the default store)")
    p.add_argument("--scope-prefix", action="append", default=[], help="move the scopes starting with this "
                   "(repeatable)")
    p.add_argument("--scopes-from", metavar="FILE", help="move the scopes listed in FILE, one a line ('#' comments)")
    p.add_argument("--reason", default="")
    cmds.add_parser("placement", help="which store serves which scopes, with scopes and records per store")
    p = cmds.add_parser("status", help="phase, backfill progress, repair queue")
    p.add_argument("--watch", action="store_true", help="keep showing it (Ctrl-C to stop)")
    p.add_argument("--interval", type=float, default=1.0)
    p = cmds.add_parser("advance", help="move to the next phase")
    p.add_argument("--from", dest="expected", choices=sorted(PHASES), help="the phase you expect to leave "
                   "(default: the current one, read first)")
    p.add_argument("--reason", default="")
    p = cmds.add_parser("route", help="shift reads to the secondary (by hand or on a ramp), set shadow sampling")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--read-fraction", type=float, help="fraction of reads served by the secondary, 0..1")
    how.add_argument("--ramp", nargs="?", const="", metavar="STEPS",
                     help="step the read fraction up while the policy passes, e.g. 0.01,0.05,0.25,0.5,1 "
                          "(no value: the policy file's schedule)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds per ramp step (0: the policy's)")
    p.add_argument("--shadow-rate", type=float, default=0.0, help="fraction of reads compared in the background")
    p = cmds.add_parser("mismatches", help="recent shadow-read mismatches with both answers")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--operation", default="", help="only this RPC, e.g. SemanticSearch")
    p.add_argument("--scope", default="")
    p = cmds.add_parser("pause", help="pause the backfill")
    p.add_argument("--reason", default="")
    cmds.add_parser("resume", help="resume the backfill")
    p = cmds.add_parser("rollback", help="return reads and writes to the old primary")
    p.add_argument("--reason", required=True)
    p = cmds.add_parser("verify", help="full diff of primary and secondary")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--repair", action="store_true", help="queue every differing key for repair")
    cmds.add_parser("history", help="every phase change with who, why and the figures")


def admin_token(token: str | None, token_file: str, flag: str = "--token") -> str:
    """The admin bearer token: given, or read from the file a proxy without a configured one writes."""
    if token:
        return token
    try:
        return read_secret_file(token_file)
    except OSError:
        raise SystemExit(f"memshift: no admin token: pass {flag}, set MEMSHIFT_ADMIN_TOKEN, or make "
                         f"{token_file} readable") from None


def _bar(done: int, total: int, width: int = 30) -> str:
    frac = min(1.0, done / total) if total else 1.0
    filled = int(frac * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {frac * 100:5.1f}%"


def _eta(seconds: float) -> str:
    if seconds < 0:
        return "?"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


_STEPS = {"settling": "every page copied; settling texts and vectors",
          "indexing": "every page copied; building the new store's indexes"}


def render(st: pb.MigrationStatus) -> str:
    b, c = st.backfill, st.counters
    lines = [f"phase      {PHASE_NAMES.get(st.phase, '?')}  (migration {st.migration_id})"]
    if st.rolled_back:  # what an operator must see first after an automatic rollback
        lines.insert(0, f"ROLLED BACK {st.rolled_back}")
    down = "  (UNREACHABLE: not serving; reconnecting)" if st.primary_unreachable else ""
    lines.append(f"primary    {st.primary}{down}")
    if st.secondary:
        lines.append(f"secondary  {st.secondary}")
        if st.selection.scopes or st.selection.scope_prefixes:
            lines.append(f"moving     {st.selection.shown} (every other scope stays where it is)")
    if st.placement.placed:
        lines.append(f"placement  default {st.placement.default_store}, {len(st.placement.placed)} placed elsewhere "
                     "(memshift admin placement)")
    if st.phase == pb.DATA_MIGRATION or b.total:
        state = ("complete" if b.complete else "paused" if b.paused else _STEPS.get(b.step, b.step) if b.step
                 else f"ETA {_eta(b.eta_seconds)}")
        lines.append(f"backfill   {_bar(b.done, b.total)} {b.done}/{b.total}  {b.rate_per_second:,.0f} rec/s  "
                     f"{state}")
        if b.rest_seconds > 0 and not b.complete:
            lines.append(f"           resting {b.rest_seconds * 1000:,.0f} ms between pages: agents' writes are slower "
                         "than agent_latency_target allows")
        if b.copying_changes_since_unix:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.copying_changes_since_unix))
            lines.append(f"           {b.copied} written: only what changed since {since} (the target had the rest)")
    if st.secondary_unreachable:
        lines.append(f"OUTAGE     new store unreachable for {_eta(time.time() - st.secondary_unreachable_since_unix)}"
                     f" ({st.secondary_unreachable}): reads on the primary, writes queued, backfill and ramp held")
    since = time.strftime("%H:%M:%S", time.localtime(c.since_unix)) if c.since_unix else "?"
    lines.append(f"repairs    {st.repair_queue_depth} pending; since {since}: dual writes {c.dual_writes} "
                 f"({c.secondary_failures} failed, {c.secondary_late} late, {c.effect_mismatches} differed, "
                 f"{c.secondary_skipped} skipped while unreachable), {c.repairs_done} repaired, "
                 f"{c.repair_failures} keys failed at least once")
    if st.read_fraction or st.shadow_sample_rate:
        lines.append(f"reads      {st.read_fraction:.0%} from secondary ({st.reads.served_by_secondary} served, "
                     f"{st.reads.fallbacks} fell back to primary), shadow sample {st.shadow_sample_rate:.0%}")
    if st.ramp.running or st.ramp.note:
        steps = " → ".join(f"{f:.0%}" for f in st.ramp.steps)
        state = f"step {st.ramp.step + 1}/{len(st.ramp.steps)}" if st.ramp.running else "not running"
        lines.append(f"ramp       {state}  [{steps}]  {st.ramp.note}")
    sh = st.shadow
    if sh.started or sh.dropped:
        lines.append(f"shadow     {sh.started} run: {sh.matched} matched, {sh.mismatched} mismatched, {sh.errors} "
                     f"errors, {sh.timeouts} timed out; {sh.dropped} dropped (saturated)")
    for r in st.policy:
        value = "-" if r.verdict == "no-data" else f"{r.value:.4g}"
        lines.append(f"policy     {r.name}: {r.verdict}  {r.metric}={value} (limit {r.threshold:g}, "
                     f"{r.samples}/{r.min_samples} samples, {r.streak}/{r.consecutive} breaches → {r.action})")
    if st.rollback_window_seconds_left:
        lines.append(f"rollback   possible for {_eta(st.rollback_window_seconds_left)}")
    if st.last_verify_differences >= 0:
        lines.append(f"verify     last run: {st.last_verify_differences} differences")
    if st.blocked:
        lines.append(f"BLOCKED    {st.blocked}")
    if st.backfill_waiting_for:
        lines.append(f"backfill   waits for {', '.join(st.backfill_waiting_for)} to acknowledge DataMigration")
    for m in st.proxies:
        role = " backfill leader" if m.leader else ""
        health = "live" if m.live else "LEASE LAPSED (refuses writes)"
        lines.append(f"proxy      {m.node} ({m.address}): {PHASE_NAMES.get(m.phase, '?')} of migration "
                     f"{m.migration_id}, heartbeat {m.heartbeat_age_seconds:.1f}s ago, {health}{role}")
    return "\n".join(lines)


def scopes_chosen(listed: str, from_file: str | None) -> list[str]:
    """The scopes of `--scopes` and `--scopes-from`, in order (the proxy checks each and names the one to fix)."""
    chosen = [s.strip() for s in listed.split(",") if s.strip()]
    if from_file:
        try:
            text = Path(from_file).read_text()
        except OSError as exc:
            raise SystemExit(f"memshift: --scopes-from: cannot read {from_file}: {exc.strerror}") from None
        chosen += [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]
    return chosen


def render_placement(st: pb.MigrationStatus) -> str:
    p = st.placement
    lines = [f"default    {p.default_store}"]
    lines += [f"{'prefix' if e.prefix else 'scope':10} {e.scope}{'*' if e.prefix else ''} -> {e.store}"
              for e in p.placed]
    for c in st.stores:
        counted = f"ERROR {c.error}" if c.error else f"{c.scopes} scopes, {c.records} records"
        lines.append(f"store      {c.store}: {counted}")
    if st.secondary:
        lines.append(f"moving     {st.selection.shown} ({PHASE_NAMES.get(st.phase, '?')})")
        lines += [f"  {c.scope}: {c.source_records} records on the source, {c.target_records} on the target"
                  for c in st.selected]
    return "\n".join(lines)


def _routing(args: argparse.Namespace) -> pb.SetReadRoutingRequest:
    if args.ramp is None:
        return pb.SetReadRoutingRequest(read_fraction=args.read_fraction, shadow_sample_rate=args.shadow_rate)
    try:
        steps = [float(x) for x in args.ramp.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"memshift: --ramp takes fractions separated by commas, e.g. 0.01,0.25,1 (got "
                         f"{args.ramp!r})") from None
    return pb.SetReadRoutingRequest(ramp=True, ramp_steps=steps, ramp_interval_seconds=args.interval,
                                    shadow_sample_rate=args.shadow_rate)


def run(args: argparse.Namespace) -> int:
    metadata = (("authorization", f"Bearer {admin_token(args.token, args.token_file)}"),
                ("x-memshift-actor", args.actor))
    if args.tls_ca:
        creds = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        opened = grpc.secure_channel(args.admin_target, creds)
    else:
        opened = grpc.insecure_channel(args.admin_target)
    with opened as channel:
        stub = pb_grpc.MigrationAdminStub(channel)
        cmd = args.admin_command
        if cmd == "status" and args.watch:
            try:
                for st in stub.WatchStatus(pb.WatchStatusRequest(interval_seconds=args.interval), metadata=metadata):
                    print("\033[2J\033[H" + render(st) if sys.stdout.isatty() else render(st) + "\n", flush=True)
            except KeyboardInterrupt:
                return 0
            return 0
        if cmd == "status":
            print(render(stub.GetStatus(pb.GetStatusRequest(), metadata=metadata)))
        elif cmd == "placement":
            print(render_placement(stub.GetStatus(pb.GetStatusRequest(count_stores=True), metadata=metadata)))
        elif cmd == "start":
            st = stub.StartMigration(pb.StartMigrationRequest(
                target=args.target, batch_size=args.batch_size, rate_limit=args.rate_limit, workers=args.workers,
                reembed=args.reembed, mirror_seconds=args.mirror_seconds, require_verify=args.require_verify,
                full_copy=args.full_copy, scopes=scopes_chosen(args.scopes, args.scopes_from),
                scope_prefixes=args.scope_prefix, reason=args.reason), metadata=metadata)
            print(render(st))
        elif cmd == "advance":
            expected = PHASES[args.expected] if args.expected else stub.GetStatus(
                pb.GetStatusRequest(), metadata=metadata).phase
            print(render(stub.Advance(pb.AdvanceRequest(expected_phase=expected, reason=args.reason),
                                      metadata=metadata)))
        elif cmd == "route":
            print(render(stub.SetReadRouting(_routing(args), metadata=metadata)))
        elif cmd == "mismatches":
            found = stub.ListMismatches(pb.ListMismatchesRequest(limit=args.limit, operation=args.operation,
                                                                 scope=args.scope), metadata=metadata)
            latest = f"; the latest {len(found.samples)}:" if found.samples else ""
            print(f"{found.total_mismatches} mismatches seen by this proxy{latest}")
            for m in found.samples:
                when = time.strftime("%H:%M:%S", time.localtime(m.at_unix))
                print(f"{when}  {m.operation} scope={m.scope} request={m.request!r}\n    {m.detail}\n"
                      f"    primary:   {m.primary}\n    secondary: {m.secondary}")
        elif cmd == "pause":
            print(render(stub.PauseBackfill(pb.PauseBackfillRequest(reason=args.reason), metadata=metadata)))
        elif cmd == "resume":
            print(render(stub.ResumeBackfill(pb.ResumeBackfillRequest(), metadata=metadata)))
        elif cmd == "rollback":
            print(render(stub.Rollback(pb.RollbackRequest(reason=args.reason), metadata=metadata)))
        elif cmd == "verify":
            started = time.monotonic()
            last = None
            for last in stub.Verify(pb.VerifyRequest(resume=args.resume, repair=args.repair), metadata=metadata):
                if not last.done:
                    print(f"verified {last.compared} records, {last.differences} differing so far (re-checked at "
                          "the end)", flush=True)
            if last is None:
                return 1
            repaired = f", {last.repaired} repaired" if args.repair else ""
            print(f"verified {last.compared} records in {time.monotonic() - started:.1f}s: "
                  f"{last.differences} differences ({last.in_flight} more were writes in flight{repaired})")
            for s in last.scopes:
                print(f"  {s.scope}: primary {s.primary_records}, secondary {s.secondary_records}, "
                      f"differences {s.differences}")
            for d in last.samples:
                print(f"  differs {d.key}\n    primary:   {d.primary or '(missing)'}\n"
                      f"    secondary: {d.secondary or '(missing)'}")
            return 0 if last.differences == 0 else 3
        elif cmd == "history":
            for h in stub.GetHistory(pb.GetHistoryRequest(), metadata=metadata).changes:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.at_unix))
                figures = ", ".join(f"{k}={v}" for k, v in sorted(h.figures.items()))
                print(f"{when}  {PHASE_NAMES.get(h.from_phase)} -> {PHASE_NAMES.get(h.to_phase)}  by {h.actor}: "
                      f"{h.reason}" + (f"  ({figures})" if figures else ""))
    return 0
