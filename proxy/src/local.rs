//! What runs on a worker's own thread, for the modules below the worker (HTTP, upstream
//! pools) that must not import it: the executor hyper's connection tasks are spawned with.

use std::future::Future;

/// Runs hyper's background futures on the current worker (they need not be `Send`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}
