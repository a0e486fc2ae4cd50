//! Passing a file descriptor from the sandbox's `init` to childflow over a Unix socket pair
//! (`SCM_RIGHTS`, unix(7)).
//!
//! The rootless tap must be created inside the command's network namespace (a tap belongs to
//! the namespace it was created in), by `init`, and then used by childflow's engine in the
//! host's namespaces; the descriptor is what crosses over.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

/// Failures passing a descriptor.
#[derive(Debug, thiserror::Error)]
pub enum FdPassError {
    /// The socket pair could not be created.
    #[error("failed to create a socket pair for passing the tap device")]
    SocketPair(#[source] nix::Error),
    /// `sendmsg` failed.
    #[error("failed to send the tap device to childflow")]
    Send(#[source] nix::Error),
    /// `recvmsg` failed.
    #[error("failed to receive the tap device from the sandbox")]
    Recv(#[source] nix::Error),
    /// The message carried no descriptor (the sandbox failed before sending it).
    #[error("the sandbox sent no tap device")]
    Missing,
}

/// A connected pair: `.0` stays with childflow, `.1` goes to `init`.
pub fn pair() -> Result<(OwnedFd, OwnedFd), FdPassError> {
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(FdPassError::SocketPair)
}

/// Sends `fd` over `sock`. Allocation-free, so `init` may call it after the fork.
pub fn send(sock: BorrowedFd<'_>, fd: RawFd) -> Result<(), FdPassError> {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(b"T")];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(FdPassError::Send)?;
    Ok(())
}

/// Receives one descriptor from `sock` (blocking).
pub fn recv(sock: BorrowedFd<'_>) -> Result<OwnedFd, FdPassError> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg =
        recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(FdPassError::Recv)?;
    for cmsg in msg.cmsgs().map_err(FdPassError::Recv)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(&fd) = fds.first()
        {
            // SAFETY: the kernel just installed this descriptor in our table for us.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(FdPassError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Seek, Write},
        os::fd::AsFd,
    };

    #[test]
    fn a_file_descriptor_crosses_the_pair() {
        let (parent, child) = pair().expect("socketpair");
        let mut file = tempfile::tempfile().expect("a temp file");
        file.write_all(b"tap").unwrap();
        send(child.as_fd(), file.as_raw_fd()).expect("send");
        let got = recv(parent.as_fd()).expect("recv");
        let mut same = std::fs::File::from(got);
        same.rewind().unwrap();
        let mut s = String::new();
        same.read_to_string(&mut s).unwrap();
        assert_eq!(s, "tap");
    }

    #[test]
    fn a_closed_sender_is_reported() {
        let (parent, child) = pair().expect("socketpair");
        drop(child);
        assert!(matches!(recv(parent.as_fd()), Err(FdPassError::Missing)));
    }
}
