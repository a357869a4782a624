//! One signal source for the whole process: SIGTERM and SIGINT cancel one
//! [`CancellationToken`] that every long-running task selects on; SIGHUP calls a reload hook.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT and calls `on_hup` on every SIGHUP, until the
/// token is cancelled by anyone.
pub async fn watch_signals(token: CancellationToken, on_hup: impl Fn() + Send + 'static) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => on_hup(),
        }
    }
    token.cancel();
}
