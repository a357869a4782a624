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
