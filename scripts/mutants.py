"""Guarantee mutants: for each guarantee the project makes, the exact edit that breaks it and the tests
expected to catch it. Each edit is applied to a temporary copy of the work tree (its tracked files, and new
files git does not ignore), whose tests then run with `python -m pytest -x` in that copy (PYTHONPATH and
working directory: the agent processes the tests start import the mutated code too). A mutant is caught when
pytest reports failing tests (exit code 1); passing tests mean it survived (a test is missing); any other
exit (collection or usage errors, a timeout) is an error of the entry. An entry whose `old` text does not
occur exactly once in its file is broken: the code moved, update the entry.

    python scripts/mutants.py --json             # every mutant: JSON lines
    python scripts/mutants.py --only replay-cache --only epoch-of-pass
    python scripts/mutants.py --baseline         # every entry's tests on the unmutated copy: must pass
    python scripts/mutants.py --list             # the entries, and whether each still applies

Not part of the test command: a full run takes about 11 minutes on 2 cores (live rings). Exit status 1
when a mutant survives or an entry is broken or fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1800   # one mutant's tests, in all

# Each entry: name, guarantee (one sentence), file, old (exact source text, once in the file), new, tests
# (pytest arguments: node ids, or a file with -k; -k applies to the whole selection).
MUTANTS = [
    # --- caught since the hardening and the planner issues ---------------------------------------------------
    dict(name="tls-peer-pin",
         guarantee="A peer id that comes back with another TLS certificate than the one it first authenticated "
                   "with is refused.",
         file="peer/security.py",
         old="        if pinned != fp:\n            raise RingAuthError(",
         new="        if False:\n            raise RingAuthError(",
         tests=["tests/test_tls.py::test_a_peer_id_that_comes_back_with_another_certificate_is_refused"]),
    dict(name="microbatch-accumulation",
         guarantee="A step's microbatch gradients add up before the optimizer steps (N-split with microbatches "
                   "equals plain PyTorch on the whole batch).",
         file="pipeline/stage.py",
         old="        y.backward(grad)\n",
         new="        for m in self.layers.values():\n            m.zero_grad(set_to_none=True)\n"
             "        y.backward(grad)\n",
         tests=["tests/test_pipeline.py::test_local_nsplit_equals_plain_pytorch"]),
    dict(name="replay-cache",
         guarantee="A signed request whose nonce was seen within the time window is refused as a replay.",
         file="protocols/auth.py",
         old='        if nonce in self._seen:\n            raise ProtocolError("replay"',
         new='        if False:\n            raise ProtocolError("replay"',
         tests=["tests/test_security.py::test_stale_requests_and_replayed_nonces_are_refused",
                "tests/test_security_ring.py::test_a_replayed_request_is_refused"]),
    dict(name="unsigned-private-get",
         guarantee="On a ring with a secret, an unsigned request gets only GET /status and the dashboard's "
                   "public view answered; every other route, GETs included, answers 401.",
         file="peer/security.py",
         old='(request.method == "GET" and request.path in PUBLIC and H_AUTH not in request.headers)',
         new='(request.method == "GET" and H_AUTH not in request.headers)',
         tests=["tests/test_security.py::test_without_the_secret_every_private_call_is_refused"]),
    dict(name="planner-in-flight",
         guarantee="The planner counts every microbatch a pipelined (fast) stage holds at once against its memory "
                   "budget.",
         file="pipeline/planner/model.py",
         old="        programs = [(schedule(position, stages, microbatches), True) for schedule in S.PIPELINES.values()]",
         new="        programs = [(schedule(position, stages, 1), True) for schedule in S.PIPELINES.values()]",
         tests=["tests/test_planner.py::test_fast_keeps_every_microbatch_in_flight"]),
    dict(name="remote-step-snapshot",
         guarantee="After each optimizer step a remote backward snapshots the new weights, which the forward "
                   "role then runs on.",
         file="pipeline/execute.py",
         old="            versions[s + 1] = stage.snapshot(ahead=max_staleness)",
         new="            versions[s + 1] = versions[s]",
         tests=["tests/test_fast.py::test_remote_backward_on_a_live_ring"]),
    dict(name="abort-on-failure",
         guarantee="A job that fails has every stage aborted (freed) before the failure is reported.",
         file="peer/coordinator.py",
         old='            await self._abort(reason)\n            await self._record("failed", error=reason)',
         new='            await self._record("failed", error=reason)',
         tests=["tests/test_jobplan.py::test_a_failing_peer_is_reported_with_its_cause_and_every_stage_aborted"]),
    dict(name="epoch-of-pass",
         guarantee="A pass belongs to the epoch its rotation falls in (rotation r: epoch r // N), which orders its "
                   "head's samples.",
         file="pipeline/jobplan.py",
         old="        return [(e, e * n + r, k == len(self.heads) - 1)",
         new="        return [(0, e * n + r, k == len(self.heads) - 1)",
         tests=["tests/test_jobplan.py::test_a_plan_visits_every_head_with_data_once_per_epoch_and_swaps_between_passes"]),

    # --- hardening (docs/security.md) ------------------------------------------------------------------------
    dict(name="model-allow-list",
         guarantee="A job naming custom model code its owner did not allow (--allow-model) is refused before any "
                   "import.",
         file="pipeline/models.py",
         old="    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed):",
         new="    if False:",
         tests=["tests/test_fuzz_jobs.py::test_specs_naming_code_are_refused_in_process_unless_allowed",
                "tests/test_safety.py::test_a_job_naming_code_the_owner_did_not_allow_runs_nothing"]),
    dict(name="job-limits",
         guarantee="A job value outside JobLimits (epochs, batch size, lr, ...) is refused before anything is built.",
         file="peer/limits.py",
         old="        if not ok:\n            raise ConfigError(text)",
         new="        if False:\n            raise ConfigError(text)",
         tests=["tests/test_fuzz_jobs.py::test_every_bad_value_of_every_field_is_refused_in_process",
                "tests/test_safety.py::test_absurd_job_values_are_refused_before_anything_is_made_and_status_keeps_answering"]),
    dict(name="job-checked-on-every-route",
         guarantee="Every route that takes a job config (/jobs, /plan, /job/prepare, /job/profile) checks it "
                   "(check_job) before using it.",
         file="peer/node.py",
         old="        check_job(cfg, self.allow_models)\n",
         new="",
         tests=["tests/test_safety.py::test_a_job_naming_code_the_owner_did_not_allow_runs_nothing"]),
    dict(name="protocol-version",
         guarantee="A message of another (or no) protocol version is refused, naming the side to upgrade.",
         file="protocols/messages.py",
         old="    if type(v) is not int or v != PROTOCOL_VERSION:",
         new="    if False:",
         tests=["tests/test_protocols.py::test_validate_version_type_and_fields",
                "tests/test_security.py::test_the_protocol_version_is_the_integer_1"]),
    dict(name="spec-hash",
         guarantee="A peer whose model code differs from the coordinator's (spec hash) refuses the job clearly.",
         file="peer/services/work.py",
         old='        if mine != msg["spec_hash"]:',
         new="        if False:",
         tests=["tests/test_bad_input.py::test_a_peer_without_the_models_code_refuses_the_job_clearly[different]"]),
    dict(name="oversized-frame",
         guarantee="A data-plane frame larger than the limit is refused from its header, before its payloads are "
                   "read.",
         file="peer/transport.py",
         old="        if size > self.max_frame:",
         new="        if False:",
         tests=["tests/test_transport.py::test_a_malformed_stream_yields_one_error_and_ends"]),
    dict(name="coalesced-order",
         guarantee="Frames go out in the order sent: small frames queued for one write go before a larger frame.",
         file="peer/transport.py",
         old="            self._flush()   # frames queued before this one go first\n",
         new="",
         tests=["tests/test_transport.py::test_frames_sent_in_one_turn_of_the_loop_go_out_in_one_write_in_order"]),
    dict(name="read-ahead-intact",
         guarantee="Frames arrive whole and intact however the kernel cuts the stream (headers parsed where they "
                   "lie in the read-ahead buffer).",
         file="peer/transport.py",
         old="                if self._target is self._prefix and not self._pos and len(data) > 4:",
         new="                if self._target is self._prefix and len(data) > 4:",
         tests=["tests/test_transport.py::test_two_frames_cut_at_every_byte_are_read_whole",
                "tests/test_transport.py::test_frames_are_read_whole_however_the_stream_is_cut"]),
    dict(name="request-signature",
         guarantee="A request signed with another secret (or not bound to this request) is refused.",
         file="protocols/auth.py",
         old="    if not hmac.compare_digest(want, tag):",
         new="    if False:",
         tests=["tests/test_security.py::test_signed_request_verifies_and_any_change_does_not"]),
    dict(name="request-time-window",
         guarantee="A signed request whose time is more than 60 s off the receiver's clock is refused.",
         file="protocols/auth.py",
         old="    if not abs(now - when) <= MAX_SKEW:",
         new="    if False:",
         tests=["tests/test_security.py::test_stale_requests_and_replayed_nonces_are_refused"]),
    dict(name="response-signature",
         guarantee="A caller refuses an answer not signed by a ring member for its request's nonce and status "
                   "(mutual authentication).",
         file="protocols/auth.py",
         old="    return tag is not None and hmac.compare_digest(sign_response(key, nonce, status, fingerprint), tag)",
         new="    return tag is not None",
         tests=["tests/test_security.py::test_response_signature_is_bound_to_the_request_nonce_and_status"]),
    dict(name="handshake-proof",
         guarantee="A data-plane peer that cannot prove the ring secret in the handshake is refused, on both ends.",
         file="protocols/auth.py",
         old="    return isinstance(proof, bytes) and hmac.compare_digest(want, proof)",
         new="    return isinstance(proof, bytes)",
         tests=["tests/test_security.py::test_handshake_refused_on_both_sides_without_the_same_key",
                "tests/test_security.py::test_a_captured_handshake_cannot_be_replayed"]),
    dict(name="handshake-timeout",
         guarantee="A data-plane connection that has not proved itself within handshake_s is closed.",
         file="peer/services/data.py",
         old="        deadline = asyncio.timeout(LIMITS.handshake_s)",
         new="        deadline = asyncio.timeout(None)",
         tests=["tests/test_security_ring.py::test_a_data_plane_connection_that_never_proves_itself_is_closed"]),

    # --- recovery (docs/recovery.md) -------------------------------------------------------------------------
    dict(name="stale-journal",
         guarantee="A peer refuses a journal older, by (commit, attempt), than the one it holds.",
         file="peer/state.py",
         old="        if here is not None and journal_order(record) < journal_order(here):",
         new="        if False:",
         tests=["tests/test_guarantees.py::test_a_journal_older_than_the_one_held_is_refused"]),
    dict(name="restore-checksum",
         guarantee="A checkpoint (or replica) whose sha256 differs from the journal's is refused on restore.",
         file="peer/state.py",
         old="        if not ok:\n            raise CorruptFile(f\"{path} does not match",
         new="        if False:\n            raise CorruptFile(f\"{path} does not match",
         tests=["tests/test_guarantees.py::test_a_checkpoint_that_does_not_match_the_journal_is_refused_on_restore"]),
    dict(name="replica-checksum",
         guarantee="A replica (sent in pieces) is kept only once all of it has come and its bytes match the "
                   "checksum its owner sent.",
         file="peer/state.py",
         old="        if got != digest:\n            part.unlink()",
         new="        if False:\n            part.unlink()",
         tests=["tests/test_guarantees.py::test_a_replica_whose_bytes_do_not_match_its_checksum_is_not_kept"]),
    dict(name="earlier-attempt-message",
         guarantee="A data-plane message of an earlier attempt of the job is refused as stale.",
         file="pipeline/admission.py",
         old='        if msg.get("attempt", 0) != self.attempt:',
         new="        if False:",
         tests=["tests/test_admission.py::test_other_messages_are_refused_with_a_reason"]),
    dict(name="hold-silent-coordinator",
         guarantee="A peer whose coordinator is silent for peer_timeout frees its stage and holds the job.",
         file="peer/services/work.py",
         old="                if silent > rt.cfg.peer_timeout:",
         new="                if False:",
         tests=["tests/test_recovery.py::test_the_coordinator_killed_mid_job_and_resumed_from_another_peer_finishes_exact"]),
    dict(name="one-coordinator-per-job",
         guarantee="A prepare from a second coordinator is refused while the job's coordinator is still heard from.",
         file="peer/services/work.py",
         old='        if old is not None and old.coordinator != msg["coordinator"] and \\',
         new='        if False and old is not None and old.coordinator != msg["coordinator"] and \\',
         tests=["tests/test_guarantees.py::test_a_second_coordinator_is_refused_while_the_first_is_heard_from"]),
    # --- issue 24: the six that survived, and memory during a pass --------------------------------------------
    dict(name="swap-receiver-checksum",
         guarantee="A peer refuses layer state whose checksum differs from the one its sender computed.",
         file="peer/worker.py",
         old='        if got != digest:\n            raise ProtocolError("checksum"',
         new='        if False:\n            raise ProtocolError("checksum"',
         tests=["tests/test_guarantees.py::test_layer_state_corrupted_in_transit_is_refused_by_its_receiver_and_the_job_resumes_exact"]),
    dict(name="swap-sender-checksum",
         guarantee="A swap's sender refuses a transfer unless the receiver answers the checksum of what it sent.",
         file="peer/worker.py",
         old='                if reply["checksum"] != digest:\n                    raise JobError(f"layer transfer',
         new='                if False:\n                    raise JobError(f"layer transfer',
         tests=["tests/test_guarantees.py::test_a_receiver_whose_copy_is_not_what_was_sent_is_refused_by_the_sender"]),
    dict(name="body-hash",
         guarantee="A validly signed request whose body is not the one signed is refused.",
         file="peer/security.py",
         old="            check_body(request.headers, await request.read())\n",
         new="",
         tests=["tests/test_guarantees.py::test_a_signed_request_whose_body_was_changed_is_refused"]),
    dict(name="mailbox-at-most-once",
         guarantee="A data-plane message already delivered or consumed is refused; the model stays exact.",
         file="peer/dataplane.py",
         old="        if key in self.consumed or (key in self.slots and self.slots[key].done()):",
         new="        if False:",
         tests=["tests/test_guarantees.py::test_duplicated_and_replayed_data_plane_messages_are_refused_and_the_model_is_exact"]),
    dict(name="commit-budget",
         guarantee="A commit that would leave a peer holding more than its memory budget is refused, naming both.",
         file="peer/worker.py",
         old="        if self.memory_budget is not None and used > self.memory_budget:",
         new="        if False:",
         tests=["tests/test_guarantees.py::test_a_commit_over_the_memory_budget_is_refused_naming_the_shortfall"]),
    dict(name="receiver-backpressure",
         guarantee="A receiver stops reading from a neighbour while --pending-messages of its messages wait "
                   "unread; nothing is refused or lost.",
         file="peer/worker.py",
         old="        await self.mailbox.room(box_of(msg[\"type\"], msg.get(\"stage\", self.position)))\n",
         new="",
         tests=["tests/test_guarantees.py::test_a_receiver_that_falls_behind_stops_reading_and_the_model_is_exact"]),
    dict(name="low-water-mark",
         guarantee="The reader's low-water mark (SO_RCVLOWAT) never asks for more than is still due: it follows a "
                   "large payload's rest read by read and is back at one byte after it.",
         file="peer/transport.py",
         old="                self._set_lowat(min(left, READ_MAX) if left >= DIRECT else 1)\n",
         new="",
         tests=["tests/test_transport.py::test_the_readers_low_water_mark_never_waits_for_bytes_not_yet_sent"]),
    dict(name="commit-planned-layers",
         guarantee="A commit refuses a stage that lacks a layer of its planned range, naming the layer.",
         file="peer/worker.py",
         old="        if missing:\n            raise JobError(",
         new="        if False:\n            raise JobError(",
         tests=["tests/test_guarantees.py::test_a_commit_missing_a_layer_is_refused_naming_it"]),
    dict(name="pass-budget",
         guarantee="A pass that comes to hold more than its peer's memory budget stops the job, naming the excess.",
         file="peer/worker.py",
         old="        if used > self.memory_budget:\n",
         new="        if False:\n",
         tests=["tests/test_memory_model.py::test_live_a_pass_that_holds_more_than_its_budget_fails"]),
    dict(name="plan-every-pass-first",
         guarantee="Every pass of an epoch is planned before the job starts: one that cannot fit fails it then.",
         file="pipeline/jobplan.py",
         old="        for _ in self._plan(self.schedule()[:len(self.heads)]):\n            pass\n",
         new="        pass\n",
         tests=["tests/test_jobplan.py::test_a_pass_that_cannot_run_fails_the_check_before_the_job_starts"]),
    dict(name="memory-model-per-schedule",
         guarantee="The planner's memory model bounds what every schedule holds, deferred weight-gradient pairs "
                   "included (measured peak <= predicted).",
         file="pipeline/planner/model.py",
         old="    return max(0, max(p[0] + p[1] for p in points) - pairs), pairs, max(p[2] for p in points)\n",
         new="    return max(p[0] + p[1] for p in points), 0, max(p[2] for p in points)\n",
         tests=["tests/test_memory_model.py::test_the_issues_fast_example_is_predicted_exactly"]),
    # --- the dashboard (issue 20) ------------------------------------------------------------------------
    dict(name="dashboard-link-signed",
         guarantee="A dashboard link opens a session only if it was signed with the ring key.",
         file="protocols/auth.py",
         old='    if not hmac.compare_digest(want, fields["mac"]):\n        raise ProtocolError("unauthenticated", "this dashboard',
         new='    if False:\n        raise ProtocolError("unauthenticated", "this dashboard',
         tests=["tests/test_dashboard.py", "-k", "links"]),
    dict(name="dashboard-link-expires",
         guarantee="A dashboard link expires after DASHBOARD_LINK_S and cannot be given a longer life.",
         file="protocols/auth.py",
         old="    if expires < now or expires > now + ttl + MAX_SKEW:",
         new="    if False:",
         tests=["tests/test_dashboard.py", "-k", "links"]),
    dict(name="dashboard-link-once",
         guarantee="A dashboard link opens one session; used again it is refused.",
         file="peer/services/dashboard.py",
         old="            self.links.admit(nonce, time.time())\n",
         new="",
         tests=["tests/test_dashboard.py::test_forged_expired_reused_or_foreign_links_open_nothing"]),
    dict(name="dashboard-public-view",
         guarantee="Without a session, the dashboard shows what unauthenticated /status shows and nothing more.",
         file="peer/services/dashboard.py",
         old="        if not private:\n            return {\"me\": me, \"private\": False}",
         new="        if False:\n            return {\"me\": me, \"private\": False}",
         tests=["tests/test_dashboard.py::test_without_a_link_the_dashboard_shows_only_public_facts"]),
    dict(name="dashboard-session-reads-only",
         guarantee="A dashboard session (a cookie) only reads the dashboard: every other route still wants a "
                   "signed request.",
         file="peer/security.py",
         old="        if self.key is None or (request.method",
         new="        if self.key is None or request.cookies or (request.method",
         tests=["tests/test_dashboard.py::test_a_session_reads_but_starts_or_stops_nothing"]),
    dict(name="dashboard-cookie-httponly",
         guarantee="The dashboard's session cookie is out of the page's scripts' reach (HttpOnly).",
         file="peer/services/dashboard.py",
         old="max_age=SESSION_S, httponly=True,",
         new="max_age=SESSION_S, httponly=False,",
         tests=["tests/test_dashboard.py::test_forged_expired_reused_or_foreign_links_open_nothing"]),
    # --- models no single device holds (issue 21) ------------------------------------------------------
    dict(name="swap-receive-budget",
         guarantee="Layers received in a swap that would take the stage over its budget are refused.",
         file="peer/worker.py",
         old="            if held > self.memory_budget:",
         new="            if False:",
         tests=["tests/test_guarantees.py::test_layers_received_in_a_swap_over_the_memory_budget_are_refused"]),
    dict(name="saved-activations-counted",
         guarantee="A stage's memory counts what autograd saved for each microbatch's backward (a block's "
                   "intermediate activations), and the planner predicts it.",
         file="pipeline/stage.py",
         old="            buffers += sum(saved.values())\n",
         new="",
         tests=["tests/test_memory_model.py", "-k", "cnn4-nsplit"]),
    dict(name="evaluation-mode",
         guarantee="Evaluation runs layers in evaluation mode: BatchNorm uses its running statistics and leaves "
                   "them as they were.",
         file="pipeline/stage.py",
         old="        for m in self.layers.values():\n            m.eval()\n",
         new="",
         tests=["tests/test_resnet.py::test_stage_evaluate_uses_running_statistics_and_leaves_them_alone"]),
    dict(name="per-token-loss",
         guarantee="A language model's loss is the mean over its positions per sample (split runs equal plain "
                   "PyTorch; held-out loss per token).",
         file="pipeline/loss.py",
         old="    positions = math.prod(labels.shape[1:])",
         new="    positions = 1",
         tests=["tests/test_gpt.py::test_loss_of_a_language_model_is_per_token"]),
    dict(name="swap-spill-to-disk",
         guarantee="A layer received in a swap that does not fit beside the stage's layers and those received "
                   "before waits on disk until the commit, so the stage stays within its budget.",
         file="peer/worker.py",
         old="            if held + state_bytes(pending.values()) > self.memory_budget:   # kept on disk until the commit",
         new="            if False:",
         tests=["tests/test_guarantees.py::"
                "test_a_received_layer_that_does_not_fit_beside_the_others_waits_on_disk_for_the_commit"]),
    dict(name="swap-room-planned",
         guarantee="The plan leaves room in every budget for a layer received in a swap beside those held until "
                   "the commit.",
         file="pipeline/jobplan.py",
         old="    return (max(l.param_bytes + l.optim_bytes for l in layers),",
         new="    return (0,",
         tests=["tests/test_jobplan.py", "-k", "every_planned_swap"]),
    dict(name="message-room-planned",
         guarantee="The plan leaves room in every budget for the messages its peer lets wait unread "
                   "(--pending-messages per kind, and one more read).",
         file="pipeline/jobplan.py",
         old="            2 * (pending_messages + 1) * max(l.activation_bytes for l in layers))",
         new="            0)",
         tests=["tests/test_jobplan.py", "-k", "room_for_the_messages"]),
    dict(name="unread-messages-counted",
         guarantee="Messages waiting unread count in a peer's peak and against its memory budget.",
         file="peer/worker.py",
         old="        used = self.stage_bytes + self.mailbox.unread_bytes",
         new="        used = self.stage_bytes",
         tests=["tests/test_memory_model.py", "-k", "count_in_the_peak"]),
    dict(name="eval-batch-under-budgets",
         guarantee="On a ring with memory budgets, evaluation messages are no larger than a training "
                   "microbatch's (the room a plan keeps for messages holds them).",
         file="peer/coordinator.py",
         old="            self.cfg = replace(self.cfg, eval_batch=min(self.cfg.eval_batch, microbatch_rows(self.cfg)))",
         new="            pass",
         tests=["tests/test_memory_model.py", "-k", "waiting_unread_count_against"]),
]


class Broken(ValueError):
    """An entry that no longer applies: its `old` text is not in its file exactly once."""


def apply_edit(text: str, old: str, new: str) -> str:
    """`text` with the one occurrence of `old` replaced by `new`."""
    count = text.count(old)
    if count != 1:
        raise Broken(f"old text found {count} times (expected once): code moved, update the entry")
    return text.replace(old, new)


def copy_tree(dest: Path, rev: str | None) -> None:
    """The work tree's tracked and new (not ignored) files, or with `rev` that revision's files, into dest."""
    if rev:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():   # (a tracked file deleted in the work tree is left out)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(tree: Path, tests: list[str]) -> tuple[int, str]:
    """pytest's exit code (-1: timed out) and its output's tail, run in `tree` on `tree`'s code."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    where = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                            "print(*(u.find_spec(p).origin for p in ('peer', 'pipeline', 'protocols')))"],
                           cwd=tree, env=env, capture_output=True, text=True).stdout.split()
    if len(where) != 3 or not all(Path(f).is_relative_to(tree) for f in where):
        return 3, f"the copy's packages are not the ones imported: {where}"
    args = [a for t in tests for a in shlex.split(t)]
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S} s"
    return proc.returncode, (proc.stdout + proc.stderr)[-800:]


def run_one(m: dict, rev: str | None, mutate: bool = True) -> dict:
    """One entry's tests on a copy, mutated (or, for the baseline, not): its report."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        tree = Path(tmp)
        copy_tree(tree, rev)
        path = tree / m["file"]
        try:
            mutated = apply_edit(path.read_text(), m["old"], m["new"])   # (checked for the baseline too)
        except (Broken, FileNotFoundError) as e:
            code, detail = None, f"broken: {m['file']}: {e}"
        else:
            if mutate:
                path.write_text(mutated)
            code, tail = run_tests(tree, m["tests"])
            detail = "survived: every test passed" if mutate and code == 0 else f"error: pytest exit {code}: {tail}"
    ok = code == (1 if mutate else 0)
    report = {"mutant": m["name"], "guarantee": m["guarantee"], ("caught" if mutate else "passed"): ok,
              "seconds": round(time.monotonic() - t0, 1), "tests": m["tests"]}
    return report if ok else {**report, "detail": detail}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON line per mutant")
    ap.add_argument("--only", action="append", metavar="NAME", help="only this mutant (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the entries and whether each applies")
    ap.add_argument("--baseline", action="store_true", help="run each entry's tests unmutated: they must pass")
    ap.add_argument("--rev", help="copy this git revision instead of the work tree")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m["name"] in args.only]
    unknown = set(args.only or ()) - {m["name"] for m in MUTANTS}
    if unknown:
        ap.error(f"no mutant named {', '.join(sorted(unknown))}")
    if args.list:
        broken = 0
        for m in chosen:
            try:
                apply_edit((ROOT / m["file"]).read_text(), m["old"], m["new"])
                state = "ok"
            except (Broken, FileNotFoundError) as e:
                state, broken = f"BROKEN: {e}", broken + 1
            print(f"{m['name']:28} {m['file']:26} {state}\n    {m['guarantee']}\n    tests: {' '.join(m['tests'])}")
        return 1 if broken else 0
    bad = 0
    t0 = time.monotonic()
    for m in chosen:
        r = run_one(m, args.rev, mutate=not args.baseline)
        ok = r.get("passed") if args.baseline else r["caught"]
        bad += not ok
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            verdict = ("passed" if ok else "FAILED") if args.baseline else "caught" if ok else \
                r["detail"].split()[0].upper()   # SURVIVED, BROKEN or ERROR
            print(f"{verdict:9} {m['name']:28} {r['seconds']:7.1f} s" + (f"  {r['detail']}" if not ok else ""),
                  flush=True)
    if not args.json:
        print(f"{len(chosen) - bad} of {len(chosen)} {'passed' if args.baseline else 'caught'} in "
              f"{time.monotonic() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
