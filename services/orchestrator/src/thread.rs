//! The thread the engine's tasks run on: drivers, the group-commit writer, the poller and lease
//! renewal. RPCs, and the event streams they serve, stay on the server's runtime, on the other cores.
//!
//! An execution's progress is a chain of hand-offs between tasks: a driver queues its commit and
//! waits, the writer commits and wakes the driver, the driver sends its next request and waits, the
//! response wakes it. On a multi-threaded runtime each hand-off may wake a parked worker and move
//! the chain to the other core, where the driver's state and SQLite's pages are not in cache: on
//! two cores, W1 made about five times as many context switches per execution as on one thread, and
//! took about a third more CPU. On one thread of its own each hand-off is a push onto a local
//! queue, and the next task runs at once on a warm cache.

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Starts a single-threaded runtime on a thread of its own and returns its handle.
///
/// The thread lives as long as the runtime it was started from: a task there holds the other end
/// of its stop signal, so when that runtime shuts down the engine's runtime does too, and every
/// task on it is dropped, as if they had run there.
pub fn start() -> std::io::Result<Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("meshflow-engine".into())
        .spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
        })?;
    tokio::spawn(async move {
        let _stop = stop;
        std::future::pending::<()>().await
    });
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_thread_stops_with_the_runtime_that_started_it() {
        let starter = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (engine, ran_on) = starter.block_on(async {
            let engine = start().expect("engine thread");
            let ran_on = engine
                .spawn(async { std::thread::current().name().map(str::to_string) })
                .await
                .expect("task");
            (engine, ran_on)
        });
        assert_eq!(ran_on.as_deref(), Some("meshflow-engine"));
        // A task that never ends keeps a guard; it is dropped once the engine's runtime is.
        let (guard, dropped) = std::sync::mpsc::channel::<()>();
        engine.spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        drop(starter);
        assert_eq!(
            dropped.recv_timeout(std::time::Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
