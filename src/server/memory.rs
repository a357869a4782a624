//! Giving memory back to the operating system after a job that walked the whole store (a site
//! report, a backup) and after a wave of MQTT logins (`broker::watch`): glibc's allocator keeps
//! what such a job freed in the arena of the thread that ran it, and the blocking pool runs each
//! job on whichever thread is free, so without this the appliance's resident memory steps up by
//! the job's peak each time a new thread runs one (measured: idle 299 -> 326 -> 373 MB over
//! three reports of 100,000 devices; with this, 160 -> 130 -> 143 MB).

/// Returns the free memory of every allocator arena to the operating system.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Caps glibc's allocator at one arena per core (at least two) unless `MALLOC_ARENA_MAX` says
/// otherwise. glibc gives each thread that meets a locked arena a new one, up to eight per core,
/// and the blocking pool's many threads each end up holding the peaks of the jobs they ran:
/// measured with a 10,000-device campaign (1,000 downloads at once), peak RSS 220 -> 173 MB at
/// the same speed (BENCHMARKS.md). Call before any thread is started.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = cores.clamp(2, 64) as libc::c_int;
        // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}
