//! libvirt's node-device lifecycle events and the connection's close callback, which
//! `virt` 0.5 does not wrap (`virConnectNodeDeviceEventRegisterAny`), for the node
//! device source. Each callback copies what it was told into a `NodeNotice` for the
//! source's worker thread and returns at once: libvirt's event thread must not wait for
//! a round trip to a remote host. All of this module's unsafe code is here.

use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::sync::mpsc::Sender;
use std::time::Instant;
use virt::connect::Connect;
use virt::sys;

/// What libvirt told about node devices, for the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeNotice {
    /// A node device appeared (`VIR_NODE_DEVICE_EVENT_CREATED`).
    Created { name: String, received: Instant },
    /// A node device went away (`VIR_NODE_DEVICE_EVENT_DELETED`).
    Deleted { name: String },
    /// The connection closed or broke: no more events will come.
    Closed { reason: &'static str },
}

/// The callbacks registered on one connection. Dropping it deregisters them; libvirt then
/// frees each callback's sender through `free_sender`.
pub struct NodeDeviceRegistrations {
    /// Our own reference on the connection, so the pointer stays valid until we have
    /// deregistered, whatever order the owner drops things in.
    connection: Connect,
    lifecycle_callback_id: Option<c_int>,
    close_callback: bool,
}

/// A registration libvirt refused: which one, and libvirt's error.
#[derive(Debug)]
pub struct RegisterError {
    pub callback: &'static str,
    pub source: virt::error::Error,
}

impl NodeDeviceRegistrations {
    /// Whether the node-device lifecycle callback is registered (for the tests).
    pub fn is_registered(&self) -> bool {
        self.lifecycle_callback_id.is_some()
    }
}

/// Registers node-device LIFECYCLE events for every node device, and the close callback
/// (drivers without one, the in-process `test:///`, are accepted: they cannot break).
pub fn register(
    connection: &Connect,
    notices: &Sender<NodeNotice>,
) -> Result<NodeDeviceRegistrations, RegisterError> {
    let mut registrations = NodeDeviceRegistrations {
        connection: connection.clone(),
        lifecycle_callback_id: None,
        close_callback: false,
    };
    // On an early return, `registrations` drops and undoes what was registered so far.
    let lifecycle: unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virNodeDevicePtr,
        c_int,
        c_int,
        *mut c_void,
    ) = lifecycle_callback;
    // SAFETY: this is C's VIR_NODE_DEVICE_EVENT_CALLBACK cast: libvirt stores the pointer
    // as the generic type and calls it with the LIFECYCLE signature
    // (virConnectNodeDeviceEventLifecycleCallback), which is `lifecycle_callback`'s own,
    // because we register it for VIR_NODE_DEVICE_EVENT_ID_LIFECYCLE.
    let lifecycle = unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(
                sys::virConnectPtr,
                sys::virNodeDevicePtr,
                c_int,
                c_int,
                *mut c_void,
            ),
            unsafe extern "C" fn(sys::virConnectPtr, sys::virNodeDevicePtr, *mut c_void),
        >(lifecycle)
    };
    let opaque = Box::into_raw(Box::new(notices.clone())) as *mut c_void;
    // SAFETY: the connection pointer is valid while `registrations.connection` holds its
    // reference. A null device means every node device. libvirt owns `opaque` from a
    // successful return on and hands it back to `free_sender` exactly once, when the
    // callback is deregistered or the connection goes away.
    let id = unsafe {
        sys::virConnectNodeDeviceEventRegisterAny(
            registrations.connection.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_NODE_DEVICE_EVENT_ID_LIFECYCLE as c_int,
            Some(lifecycle),
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        let source = virt::error::Error::last_error();
        // SAFETY: on failure libvirt did not keep `opaque` and never calls the free
        // callback for it, so it is still ours.
        drop(unsafe { Box::from_raw(opaque as *mut Sender<NodeNotice>) });
        return Err(RegisterError {
            callback: "node device lifecycle",
            source,
        });
    }
    registrations.lifecycle_callback_id = Some(id);

    let opaque = Box::into_raw(Box::new(notices.clone())) as *mut c_void;
    // SAFETY: valid connection pointer as above; on success libvirt owns `opaque` and
    // frees it through `free_sender` when the callback is unregistered or after it has
    // fired once.
    let result = unsafe {
        sys::virConnectRegisterCloseCallback(
            registrations.connection.as_ptr(),
            Some(close_callback),
            opaque,
            Some(free_sender),
        )
    };
    if result < 0 {
        let source = virt::error::Error::last_error();
        // SAFETY: a failed registration leaves `opaque` with us; libvirt never saw it.
        drop(unsafe { Box::from_raw(opaque as *mut Sender<NodeNotice>) });
        if source.code().to_raw() != sys::VIR_ERR_NO_SUPPORT {
            return Err(RegisterError {
                callback: "connection close",
                source,
            });
        }
    } else {
        registrations.close_callback = true;
    }
    Ok(registrations)
}

impl Drop for NodeDeviceRegistrations {
    fn drop(&mut self) {
        // Errors are expected on a connection that already broke: libvirt still removes
        // the callback locally (and frees its sender) before it tries to tell the server.
        if self.close_callback {
            // SAFETY: valid connection pointer; `close_callback` is the function we
            // registered. After it has fired, libvirt has already dropped it and this
            // returns an error without touching the freed sender.
            let result = unsafe {
                sys::virConnectUnregisterCloseCallback(
                    self.connection.as_ptr(),
                    Some(close_callback),
                )
            };
            if result < 0 {
                log::debug!(
                    "cannot unregister the node device connection's close callback: {}",
                    virt::error::Error::last_error().message()
                );
            }
        }
        if let Some(id) = self.lifecycle_callback_id.take() {
            // SAFETY: valid connection pointer; `id` came from a successful registration
            // on this connection and is deregistered once.
            let result = unsafe {
                sys::virConnectNodeDeviceEventDeregisterAny(self.connection.as_ptr(), id)
            };
            if result < 0 {
                log::debug!(
                    "cannot deregister libvirt node device callback {id}: {}",
                    virt::error::Error::last_error().message()
                );
            }
        }
    }
}

/// # Safety
/// `opaque` must be a pointer made by `Box::into_raw(Box<Sender<NodeNotice>>)` that
/// libvirt still holds; libvirt guarantees that for the callbacks registered above.
unsafe fn sender<'a>(opaque: *mut c_void) -> &'a Sender<NodeNotice> {
    // SAFETY: see the function's contract. `Sender` is `Sync`, so a shared reference
    // may be used from libvirt's event thread while the worker holds the receiver.
    unsafe { &*(opaque as *const Sender<NodeNotice>) }
}

unsafe extern "C" fn lifecycle_callback(
    _connection: sys::virConnectPtr,
    device: sys::virNodeDevicePtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) {
    let received = Instant::now();
    // SAFETY: libvirt passes the node device the event is about, valid during the call.
    let name = unsafe { sys::virNodeDeviceGetName(device) };
    if name.is_null() {
        return;
    }
    // SAFETY: a non-null name from libvirt is a NUL-terminated string that belongs to
    // the device object, valid during the call; it is copied out.
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let notice = match u32::try_from(event) {
        Ok(sys::VIR_NODE_DEVICE_EVENT_CREATED) => NodeNotice::Created { name, received },
        Ok(sys::VIR_NODE_DEVICE_EVENT_DELETED) => NodeNotice::Deleted { name },
        // DEFINED and UNDEFINED are about mediated devices' persistent configuration.
        _ => return,
    };
    // SAFETY: `opaque` is the sender registered with this callback, alive until
    // `free_sender`. A closed channel means the source is going away: nothing to do.
    let _ = unsafe { sender(opaque) }.send(notice);
}

unsafe extern "C" fn close_callback(
    _connection: sys::virConnectPtr,
    reason: c_int,
    opaque: *mut c_void,
) {
    let reason = match u32::try_from(reason) {
        Ok(sys::VIR_CONNECT_CLOSE_REASON_EOF) => "libvirtd closed the connection",
        Ok(sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE) => "libvirtd stopped answering keepalives",
        Ok(sys::VIR_CONNECT_CLOSE_REASON_CLIENT) => "the connection was closed on our side",
        _ => "the connection to libvirtd failed",
    };
    // SAFETY: `opaque` is the sender registered with this callback.
    let _ = unsafe { sender(opaque) }.send(NodeNotice::Closed { reason });
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once per successful registration, with the pointer made
    // by `Box::into_raw` there, and never uses it again.
    drop(unsafe { Box::from_raw(opaque as *mut Sender<NodeNotice>) });
}
