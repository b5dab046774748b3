//! Each job's driver: one tokio task per job that waits for the job's current step (see
//! [`Phase`](crate::job::Phase)) to have all its tasks done, then does the coordinator's part
//! before the next step ([`crate::finalize::advance`]): concluding a measuring round,
//! queueing assembly, writing the index, report and manifest. The gRPC handlers only record
//! results; no step runs inside one of them, and a step never runs twice at once.

use std::sync::Arc;

use shardpress_proto::v1::JobState;

use crate::Coordinator;

/// Starts the driver of job `job_id` (just inserted).
pub fn spawn(coordinator: Arc<Coordinator>, job_id: String) {
    tokio::spawn(drive(coordinator, job_id));
}

/// Runs until the job ends, or until it is replaced (a job resumed under the same id gets a
/// driver of its own).
async fn drive(coordinator: Arc<Coordinator>, job_id: String) {
    let Ok(mut status) = coordinator.watch(&job_id) else {
        return;
    };
    loop {
        let state = status.borrow_and_update().state();
        if state.is_terminal() {
            return;
        }
        if state == JobState::Finalizing {
            crate::finalize::advance(&coordinator, &job_id).await;
            // `advance` moved the job on; its status says where (seen as changed below, or
            // already current when published before this receiver looked).
            if status.has_changed().unwrap_or(false) {
                continue;
            }
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}
