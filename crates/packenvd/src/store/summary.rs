//! The summary side of every statement that changes node rows (DESIGN §8): the parent's counts
//! of required node rows by status change by the difference the statement made, in the same
//! statement, so the summary costs O(1) per node write, never a recount of the parent's node
//! rows. The statement derives the parent's status from the new counts itself.
//!
//! A statement that uses it has a CTE `u` returning, per changed node row: `env_id`, `node`,
//! `status`, `required`, `old_status`, `old_required` (NULL for a row it inserted), and the
//! columns its mirror reads. One statement changes at most one node row per parent (a daemon
//! writes only its own node's rows), which is what `UPDATE ... FROM u` needs.

const STATUSES: [&str; 5] = ["pending", "installing", "ready", "failed", "outdated"];

/// `+1`/`-1`/`0`: how a changed row moves the count of `status`.
fn delta(status: &str) -> String {
    format!(
        "((u.required AND u.status = '{status}')::int \
          - (coalesce(u.old_required, false) AND u.old_status = '{status}')::int)"
    )
}

/// The CTEs that apply `u`'s changes to the parents: `d`, `u` with each count's difference
/// (`d_pending`, ...), and `p`, the parents' UPDATE, with `mirror` (`, col = expr, ...`)
/// copying what the platform reads on a single host from the node row to its parent, and
/// `error` the parent's new `install_error` (None: unchanged). The differences are worked out
/// once per row in `d` (MATERIALIZED, so the planner does not fold them back): the counts, the
/// status, the kept error and the notification all read them, and PostgreSQL prepares every
/// expression of a statement each time it runs it.
///
/// The status is derived here from the new counts, and a failed parent keeps its error when
/// the write brings none (a node ready beside a failed one), as the parent's BEFORE trigger
/// did: that trigger now runs for the platform's writes only, so the queue's statements call
/// no PL/pgSQL and prepare no trigger condition that needs planning.
pub(super) fn parents_cte(mirror: &str, error: Option<&str>) -> String {
    let [p, i, r, f, o] = STATUSES.map(|status| format!("pe.nodes_{status} + u.d_{status}"));
    let differences = STATUSES
        .map(|status| format!("{} AS d_{status}", delta(status)))
        .join(",\n                    ");
    let status = format!("pack_environment_summary({p}, {i}, {r}, {f}, {o}, pe.status)");
    let error = error.map_or_else(String::new, |e| {
        format!(
            ",\n             install_error = CASE WHEN {status} = 'failed'
                                  THEN coalesce({e}, pe.install_error) ELSE {e} END"
        )
    });
    format!(
        "d AS MATERIALIZED (
           SELECT u.*, {differences}
           FROM u),
         p AS (
           UPDATE pack_environment pe SET
             nodes_pending = {p},
             nodes_installing = {i},
             nodes_ready = {r},
             nodes_failed = {f},
             nodes_outdated = {o},
             status = {status},
             summary_seq = pe.summary_seq + 1,
             updated = now(),
             last_node = u.node {mirror}{error}
           FROM d AS u WHERE pe.id = u.env_id
           RETURNING pe.id, {notified})",
        notified =
            notify_finished(STATUSES.map(|status| format!("pe.nodes_{status} - u.d_{status}")))
    )
}

/// For the RETURNING of a statement that moves parents' summaries: tells whoever waits for an
/// environment (the client's `ensure`, on channel `pack_environment_status`, payload
/// "<id> <status>") that its parent became ready or failed. `before` are the parent's counts
/// before the statement (pending, installing, ready, failed, outdated), whose summary is the
/// status it had; a parent that counted nothing notifies. The statements do this themselves
/// rather than through a trigger per row, which cost more than the notification; the parent's
/// trigger notifies for the writes of others only (migration 8).
pub(super) fn notify_finished(before: [String; 5]) -> String {
    format!(
        "CASE WHEN pe.status IN ('ready', 'failed')
                   AND pe.status IS DISTINCT FROM pack_environment_summary({}, NULL)
              THEN pg_notify('pack_environment_status', pe.id || ' ' || pe.status) END
         AS notified",
        before.join(", ")
    )
}

/// The parent's error from a node's: prefixed with the node's name where more than one node
/// counts for the parent, so a failure names its node.
pub(super) const MIRROR_ERROR: &str = "CASE
      WHEN u.install_error IS NOT NULL
           AND pe.nodes_pending + pe.nodes_installing + pe.nodes_ready + pe.nodes_failed
               + pe.nodes_outdated > 1
      THEN 'node ' || u.node || ': ' || u.install_error
      ELSE u.install_error END";
