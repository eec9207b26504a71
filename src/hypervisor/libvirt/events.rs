//! libvirt's event loop and the domain and close callbacks that `virt` 0.5 does not wrap
//! (`virConnectDomainEventRegisterAny`, `virConnectRegisterCloseCallback`). Every callback
//! turns into an `Event` on the daemon's channel. All of this module's unsafe code is here.

use crate::event::{DomainChange, Event, EventSender};
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::OnceLock;
use virt::connect::Connect;
use virt::sys;

/// The outcome of starting the process-wide event loop, kept so every later call sees it.
static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers libvirt's default event loop implementation and starts the one thread that
/// runs it, once per process. libvirt needs both before a connection is opened, or the
/// connection cannot deliver events. Calling it again is free.
pub fn ensure_event_loop() -> Result<(), String> {
    EVENT_LOOP
        .get_or_init(|| {
            virt::event::event_register_default_impl()
                .map_err(|error| error.message().to_string())?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(run_event_loop)
                .map(|_| ())
                .map_err(|error| error.to_string())
        })
        .clone()
}

fn run_event_loop() {
    loop {
        // One iteration blocks in poll() until a watched fd or a timer fires. Without
        // keepalive timers (local URIs) it sleeps until libvirt has something to say.
        if let Err(error) = virt::event::event_run_default_impl() {
            log::error!("libvirt event loop iteration failed: {}", error.message());
            // A failing poll() would otherwise spin this thread at full speed.
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// The callbacks registered on one connection. Dropping it deregisters them; libvirt then
/// frees each callback's channel sender through `free_sender`.
pub struct Registrations {
    /// Our own reference on the connection, so the pointer stays valid until we have
    /// deregistered, whatever order the owner drops things in.
    connection: Connect,
    domain_callback_ids: Vec<c_int>,
    close_callback: bool,
}

/// What one registration could not do: libvirt's error and which callback it was.
#[derive(Debug)]
pub struct RegisterError {
    pub callback: &'static str,
    pub source: virt::error::Error,
}

/// Registers LIFECYCLE, DEVICE_REMOVED and DEVICE_ADDED for every domain, and the close
/// callback.
/// Drivers without close callbacks (the in-process `test:///` driver) are accepted:
/// they cannot lose a connection.
pub fn register(
    connection: &Connect,
    events: &EventSender,
) -> Result<Registrations, RegisterError> {
    let mut registrations = Registrations {
        connection: connection.clone(),
        domain_callback_ids: Vec::new(),
        close_callback: false,
    };
    // On an early return, `registrations` drops and undoes what was registered so far.
    let lifecycle: unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        c_int,
        c_int,
        *mut c_void,
    ) -> c_int = lifecycle_callback;
    // SAFETY: this is C's VIR_DOMAIN_EVENT_CALLBACK cast: libvirt stores the pointer as
    // the generic type and calls it with the LIFECYCLE signature, which is
    // `lifecycle_callback`'s own, because we register it for VIR_DOMAIN_EVENT_ID_LIFECYCLE.
    let lifecycle = unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(
                sys::virConnectPtr,
                sys::virDomainPtr,
                c_int,
                c_int,
                *mut c_void,
            ) -> c_int,
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(lifecycle)
    };
    registrations.register_domain_event(
        sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
        lifecycle,
        events,
        "domain lifecycle",
    )?;

    let device_removed: unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        *const c_char,
        *mut c_void,
    ) = device_removed_callback;
    // SAFETY: as above, for VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, whose callback type is
    // virConnectDomainEventDeviceRemovedCallback, the signature of
    // `device_removed_callback`.
    let device_removed = unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void),
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(device_removed)
    };
    registrations.register_domain_event(
        sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED as c_int,
        device_removed,
        events,
        "domain device removed",
    )?;

    let device_added: unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        *const c_char,
        *mut c_void,
    ) = device_added_callback;
    // SAFETY: as above, for VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, whose callback type is
    // virConnectDomainEventDeviceAddedCallback, the signature of `device_added_callback`.
    let device_added = unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void),
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(device_added)
    };
    registrations.register_domain_event(
        sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED as c_int,
        device_added,
        events,
        "domain device added",
    )?;

    registrations.register_close_callback(events)?;
    Ok(registrations)
}

impl Registrations {
    fn register_domain_event(
        &mut self,
        event_id: c_int,
        callback: unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        events: &EventSender,
        name: &'static str,
    ) -> Result<(), RegisterError> {
        let opaque = Box::into_raw(Box::new(events.clone())) as *mut c_void;
        // SAFETY: the connection pointer is valid while `self.connection` holds its
        // reference. A null domain means every domain. libvirt owns `opaque` from a
        // successful return on and hands it back to `free_sender` exactly once, when the
        // callback is deregistered or the connection goes away.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                self.connection.as_ptr(),
                std::ptr::null_mut(),
                event_id,
                Some(callback),
                opaque,
                Some(free_sender),
            )
        };
        if id < 0 {
            let source = virt::error::Error::last_error();
            // SAFETY: on failure libvirt did not keep `opaque` and never calls the free
            // callback for it (it deregisters with doFreeCb false), so it is still ours.
            drop(unsafe { Box::from_raw(opaque as *mut EventSender) });
            return Err(RegisterError {
                callback: name,
                source,
            });
        }
        self.domain_callback_ids.push(id);
        Ok(())
    }

    fn register_close_callback(&mut self, events: &EventSender) -> Result<(), RegisterError> {
        let opaque = Box::into_raw(Box::new(events.clone())) as *mut c_void;
        // SAFETY: valid connection pointer as above; on success libvirt owns `opaque`
        // and frees it through `free_sender` when the callback is unregistered or after
        // it has fired once.
        let result = unsafe {
            sys::virConnectRegisterCloseCallback(
                self.connection.as_ptr(),
                Some(close_callback),
                opaque,
                Some(free_sender),
            )
        };
        if result < 0 {
            let source = virt::error::Error::last_error();
            // SAFETY: a failed registration leaves `opaque` with us; libvirt never saw it.
            drop(unsafe { Box::from_raw(opaque as *mut EventSender) });
            if source.code().to_raw() == sys::VIR_ERR_NO_SUPPORT {
                return Ok(());
            }
            return Err(RegisterError {
                callback: "connection close",
                source,
            });
        }
        self.close_callback = true;
        Ok(())
    }
}

impl Drop for Registrations {
    fn drop(&mut self) {
        // Errors are expected on a connection that already broke: libvirt still removes
        // the callback locally (and frees its sender) before it tries to tell the server.
        if self.close_callback {
            // SAFETY: valid connection pointer; `close_callback` is the function we
            // registered. After the callback has fired, libvirt has already dropped it
            // and this returns an error without touching the freed sender.
            let result = unsafe {
                sys::virConnectUnregisterCloseCallback(
                    self.connection.as_ptr(),
                    Some(close_callback),
                )
            };
            if result < 0 {
                log::debug!(
                    "cannot unregister the libvirt close callback: {}",
                    virt::error::Error::last_error().message()
                );
            }
        }
        for id in self.domain_callback_ids.drain(..) {
            // SAFETY: valid connection pointer; `id` came from a successful registration
            // on this connection and is deregistered once.
            let result =
                unsafe { sys::virConnectDomainEventDeregisterAny(self.connection.as_ptr(), id) };
            if result < 0 {
                log::debug!(
                    "cannot deregister libvirt domain event callback {id}: {}",
                    virt::error::Error::last_error().message()
                );
            }
        }
    }
}

/// # Safety
/// `opaque` must be a pointer made by `Box::into_raw(Box<EventSender>)` that libvirt
/// still holds; libvirt guarantees that for the callbacks registered above.
unsafe fn sender<'a>(opaque: *mut c_void) -> &'a EventSender {
    // SAFETY: see the function's contract. `Sender` is `Sync`, so a shared reference
    // may be used from libvirt's event thread while the daemon holds other senders.
    unsafe { &*(opaque as *const EventSender) }
}

/// # Safety
/// `domain` must be a valid domain pointer for the duration of the call.
unsafe fn domain_name(domain: sys::virDomainPtr) -> Option<String> {
    // SAFETY: per the contract; the name belongs to the domain object and stays valid
    // while it does, so it is copied out before returning.
    let name = unsafe { sys::virDomainGetName(domain) };
    // SAFETY: a non-null name from libvirt is a NUL-terminated string.
    (!name.is_null()).then(|| {
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    })
}

unsafe extern "C" fn lifecycle_callback(
    _connection: sys::virConnectPtr,
    domain: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: libvirt passes the domain the event is about, valid during the call.
    let Some(domain) = (unsafe { domain_name(domain) }) else {
        return 0;
    };
    let change = match u32::try_from(event) {
        Ok(sys::VIR_DOMAIN_EVENT_STARTED) => DomainChange::Started,
        Ok(sys::VIR_DOMAIN_EVENT_STOPPED) => DomainChange::Stopped,
        Ok(sys::VIR_DOMAIN_EVENT_DEFINED) => DomainChange::Defined,
        _ => DomainChange::Other,
    };
    // SAFETY: `opaque` is the sender registered with this callback, alive until
    // `free_sender`. A closed channel means the daemon is exiting: nothing to do.
    let _ = unsafe { sender(opaque) }.send(Event::Domain { domain, change });
    0
}

unsafe extern "C" fn device_removed_callback(
    _connection: sys::virConnectPtr,
    domain: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: the domain and alias are libvirt's, valid for the duration of this call.
    if let Some((domain, alias)) = unsafe { device_event(domain, alias) } {
        // SAFETY: `opaque` is the sender registered with this callback.
        let _ = unsafe { sender(opaque) }.send(Event::DomainDeviceRemoved { domain, alias });
    }
}

unsafe extern "C" fn device_added_callback(
    _connection: sys::virConnectPtr,
    domain: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: the domain and alias are libvirt's, valid for the duration of this call.
    if let Some((domain, alias)) = unsafe { device_event(domain, alias) } {
        // SAFETY: `opaque` is the sender registered with this callback.
        let _ = unsafe { sender(opaque) }.send(Event::DomainDeviceAdded { domain, alias });
    }
}

/// The domain's name and the device's alias of a device event, copied out.
///
/// # Safety
/// `domain` must be a valid domain and `alias` null or a NUL-terminated string, both
/// for the duration of the call: what libvirt passes to a device event callback.
unsafe fn device_event(
    domain: sys::virDomainPtr,
    alias: *const c_char,
) -> Option<(String, String)> {
    // SAFETY: the caller passes libvirt's valid domain.
    let domain = unsafe { domain_name(domain) }?;
    if alias.is_null() {
        return None;
    }
    // SAFETY: a non-null alias from libvirt is a NUL-terminated string valid during the
    // call; it is copied out.
    let alias = unsafe { CStr::from_ptr(alias) }
        .to_string_lossy()
        .into_owned();
    Some((domain, alias))
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
    let _ = unsafe { sender(opaque) }.send(Event::HypervisorDisconnected {
        reason: reason.to_string(),
    });
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once per successful registration, with the pointer made
    // by `Box::into_raw` there, and never uses it again.
    drop(unsafe { Box::from_raw(opaque as *mut EventSender) });
}
