//! The memory allocator the services run on: each binary names [`Jemalloc`] its
//! `#[global_allocator]`, and this module gives jemalloc its options.
//!
//! jemalloc rather than glibc's malloc, which took a quarter of every service's CPU under load
//! (perf): with it the generator keeps 10,000 calls of 2 s in flight at about 4,500 jobs a
//! second instead of 3,900 (`cargo xtask bench`).

// The one exception to the workspace's `unsafe_code = "deny"`: jemalloc reads its options
// from a C symbol, which only an exported static can provide.
#![allow(unsafe_code)]

pub use tikv_jemallocator::Jemalloc;

/// jemalloc's `malloc_conf`, read once at start-up. Freed pages go back to the system within
/// a second (ten by default, and "muzzy" pages later still), which keeps the generator's peak
/// RSS with 10,000 calls in flight where glibc's was rather than 25 MB above it.
#[used]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Conf = Conf(c"dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string for jemalloc: the pointer is to a `'static` literal that is never written.
#[repr(transparent)]
struct Conf(*const std::ffi::c_char);

// SAFETY: the pointer is to immutable static data.
unsafe impl Sync for Conf {}
