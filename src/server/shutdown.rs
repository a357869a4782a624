//! One signal source for the whole process: SIGTERM and SIGINT cancel one
//! [`CancellationToken`] that every long-running task selects on; SIGHUP calls a reload hook.
//! Handlers are installed by [`Signals::install`] *before* the service reports ready, so a
//! SIGTERM that follows READY=1 at once still drains instead of killing the process.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Installed handlers for SIGTERM, SIGINT and SIGHUP.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers; from here on these signals no longer take their default action.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Cancels `token` on the first SIGTERM or SIGINT and calls `on_hup` on every SIGHUP, until
    /// the token is cancelled by anyone.
    pub async fn watch(mut self, token: CancellationToken, on_hup: impl Fn() + Send + 'static) {
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = self.term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                _ = self.int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = self.hup.recv() => on_hup(),
            }
        }
        token.cancel();
    }
}
