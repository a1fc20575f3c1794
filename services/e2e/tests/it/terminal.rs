//! Running a command on a pseudo-terminal, for the operator commands that refuse to run
//! without one (`nats stream view` pages interactively: "interactive stream paging requires a
//! valid terminal").

use std::fs::File;
use std::io::Read as _;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A new pseudo-terminal, 40 rows by 200 columns: (the controlling side, the terminal side).
#[allow(unsafe_code)] // openpty has no safe wrapper in std or libc.
fn open_pty() -> (OwnedFd, OwnedFd) {
    let (mut controller, mut terminal) = (-1, -1);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 200,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the two out-pointers are valid for writes; name and termios may be null.
    let result = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(result, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty succeeded, so both are open descriptors that nothing else owns.
    unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    }
}

/// Runs `program args` with a terminal as its stdin, stdout and stderr, and returns how it
/// exited and everything it wrote (line ends as `\n`). Kills it after `timeout`.
pub fn run(program: &Path, args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let (controller, terminal) = open_pty();
    let mut child = {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::from(terminal.try_clone().expect("dup the terminal")))
            .stdout(Stdio::from(terminal.try_clone().expect("dup the terminal")))
            .stderr(Stdio::from(terminal));
        command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()))
        // `command` and its copies of the terminal end here: only the child holds it now.
    };
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut output = Vec::new();
        // Reading ends with EIO once the child (the last holder of the terminal) has exited.
        let _ = File::from(controller).read_to_end(&mut output);
        let _ = sender.send(output);
    });
    let output = receiver.recv_timeout(timeout).unwrap_or_else(|_| {
        let _ = child.kill();
        let output = receiver.recv().unwrap_or_default();
        panic!(
            "{} {args:?} was still running after {timeout:?}; it wrote: {}",
            program.display(),
            String::from_utf8_lossy(&output)
        )
    });
    let status = child.wait().expect("wait for the child");
    (
        status,
        String::from_utf8_lossy(&output).replace("\r\n", "\n"),
    )
}
