//! The sim's event table and what WAIT_EVENTS writes back, driven directly (no transport):
//! ids are the kernel's (lowest free, signal ids below the page's slot count, other types in the
//! upper half), unknown ids are EINVAL, and a wait hands back only the event-array entries the
//! kernel's `copy_signaled_event_data` writes.

#[path = "sim_helpers.rs"]
mod sim_helpers;

use kfdmux::abi::*;
use kfdmux::device::DeviceContext;
use kfdmux::errno::Errno;
use sim_helpers::*;
use zerocopy::IntoBytes;

const ESZ: usize = std::mem::size_of::<KfdEventData>();

fn create(h: &Harness, ctx: &dyn DeviceContext, ty: u32, auto_reset: bool) -> Result<u32, Errno> {
    let mut a = KfdIoctlCreateEventArgs::new_zeroed();
    a.event_type = ty;
    a.auto_reset = auto_reset as u32;
    h.io0(ctx, AMDKFD_IOC_CREATE_EVENT, &mut a)?;
    Ok(a.event_id)
}

fn destroy(h: &Harness, ctx: &dyn DeviceContext, id: u32) -> Result<(), Errno> {
    let mut a = KfdIoctlDestroyEventArgs {
        event_id: id,
        pad: 0,
    };
    h.io0(ctx, AMDKFD_IOC_DESTROY_EVENT, &mut a)
}

fn set(h: &Harness, ctx: &dyn DeviceContext, id: u32) -> Result<(), Errno> {
    let mut a = KfdIoctlSetEventArgs {
        event_id: id,
        pad: 0,
    };
    h.io0(ctx, AMDKFD_IOC_SET_EVENT, &mut a)
}

/// WAIT_EVENTS on `(id, last_age)` pairs with timeout 0; returns the result, wait_result and the
/// event array as the device hands it back (what the marshaller writes to the client).
fn wait(
    h: &Harness,
    ctx: &dyn DeviceContext,
    evs: &[(u32, u64)],
    all: bool,
) -> (Result<(), Errno>, u32, Vec<u8>) {
    let mut data = Vec::new();
    for (id, age) in evs {
        let mut e = KfdEventData::new_zeroed();
        e.event_id = *id;
        let mut b = e.as_bytes().to_vec();
        b[..8].copy_from_slice(&age.to_le_bytes());
        data.extend_from_slice(&b);
    }
    let mut a = KfdIoctlWaitEventsArgs {
        events_ptr: 0x1000,
        num_events: evs.len() as u32,
        wait_for_all: all as u32,
        timeout: 0,
        wait_result: 0xff,
    };
    let (r, call) = h.io(
        ctx,
        AMDKFD_IOC_WAIT_EVENTS,
        &mut a,
        vec![("events_ptr", data)],
    );
    let arr = call
        .array("events_ptr")
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    (r, a.wait_result, arr)
}

#[test]
fn event_ids_are_lowest_free_and_reused_in_both_halves() {
    let h = Harness::new("gfx90a");
    let ctx = h.open_kfd();
    let sig: Vec<u32> = (0..5)
        .map(|_| create(&h, &*ctx, KFD_IOC_EVENT_SIGNAL, false).unwrap())
        .collect();
    assert_eq!(sig, [0, 1, 2, 3, 4]);
    let first_other = 0x4000_0000;
    let mem: Vec<u32> = (0..3)
        .map(|_| create(&h, &*ctx, KFD_IOC_EVENT_MEMORY, false).unwrap())
        .collect();
    assert_eq!(mem, [first_other, first_other + 1, first_other + 2]);
    // Freed ids come back lowest first; the highest one shrinks the table and comes back too.
    destroy(&h, &*ctx, 3).unwrap();
    destroy(&h, &*ctx, 1).unwrap();
    destroy(&h, &*ctx, 4).unwrap();
    assert_eq!(destroy(&h, &*ctx, 4), Err(Errno::EINVAL), "destroyed twice");
    assert_eq!(
        set(&h, &*ctx, 4),
        Err(Errno::EINVAL),
        "a destroyed id is unknown"
    );
    assert_eq!(create(&h, &*ctx, KFD_IOC_EVENT_SIGNAL, false), Ok(1));
    assert_eq!(create(&h, &*ctx, KFD_IOC_EVENT_SIGNAL, false), Ok(3));
    assert_eq!(create(&h, &*ctx, KFD_IOC_EVENT_SIGNAL, false), Ok(4));
    destroy(&h, &*ctx, first_other + 1).unwrap();
    assert_eq!(
        create(&h, &*ctx, KFD_IOC_EVENT_HW_EXCEPTION, false),
        Ok(first_other + 1)
    );
    // Live events still answer after the table changed around them.
    set(&h, &*ctx, 2).unwrap();
    assert_eq!(
        wait(&h, &*ctx, &[(2, 0)], true).1,
        KFD_IOC_WAIT_RESULT_COMPLETE
    );
    assert_eq!(h.stat("events"), 8);
    ctx.release();
    assert_eq!(h.stat("events"), 0);
}

#[test]
fn wait_on_unknown_ids_is_einval() {
    let h = Harness::new("gfx90a");
    let ctx = h.open_kfd();
    let id = create(&h, &*ctx, KFD_IOC_EVENT_SIGNAL, false).unwrap();
    set(&h, &*ctx, id).unwrap();
    // Never created, in the gap between the halves, past the last id, a destroyed one.
    let other = create(&h, &*ctx, KFD_IOC_EVENT_MEMORY, false).unwrap();
    destroy(&h, &*ctx, other).unwrap();
    for bad in [id + 1, 4096, 0x3FFF_FFFF, 0x4000_0000, u32::MAX, other] {
        let (r, res, _) = wait(&h, &*ctx, &[(id, 0), (bad, 0)], false);
        assert_eq!(r, Err(Errno::EINVAL), "id {bad:#x}");
        assert_eq!(res, KFD_IOC_WAIT_RESULT_FAIL, "id {bad:#x}");
    }
    // The known one alone still completes.
    assert_eq!(
        wait(&h, &*ctx, &[(id, 0)], false).1,
        KFD_IOC_WAIT_RESULT_COMPLETE
    );
}

#[test]
fn wait_hands_back_only_what_the_kernel_writes() {
    let h = Harness::new("gfx90a");
    let ctx = h.open_kfd();
    let ids: Vec<u32> = (0..4)
        .map(|_| create(&h, &*ctx, KFD_IOC_EVENT_SIGNAL, false).unwrap())
        .collect();
    for &id in &ids {
        set(&h, &*ctx, id).unwrap();
    }
    // Signal events waited on without an age: nothing is written, the array comes back empty
    // (no process_vm_writev at all).
    let plain: Vec<(u32, u64)> = ids.iter().map(|&i| (i, 0)).collect();
    let (r, res, arr) = wait(&h, &*ctx, &plain, true);
    assert_eq!((r, res), (Ok(()), KFD_IOC_WAIT_RESULT_COMPLETE));
    assert!(arr.is_empty(), "{} bytes handed back", arr.len());
    // An age on the second event: the age is written there, so the array ends after it; the
    // entries before it are handed back unchanged.
    let mut aged = plain.clone();
    aged[1].1 = 1;
    let (r, res, arr) = wait(&h, &*ctx, &aged, true);
    assert_eq!((r, res), (Ok(()), KFD_IOC_WAIT_RESULT_COMPLETE));
    assert_eq!(arr.len(), 2 * ESZ);
    assert_eq!(u64::from_le_bytes(arr[ESZ..ESZ + 8].try_into().unwrap()), 2);
    assert_eq!(u32::from_le_bytes(arr[40..44].try_into().unwrap()), ids[0]);
    assert_eq!(&arr[..8], &[0u8; 8], "no age was asked for the first");
    // A memory event that nothing signalled: the wait times out and writes nothing.
    let m = create(&h, &*ctx, KFD_IOC_EVENT_MEMORY, false).unwrap();
    let (r, res, arr) = wait(&h, &*ctx, &[(ids[0], 1), (m, 0)], true);
    assert_eq!((r, res), (Ok(()), KFD_IOC_WAIT_RESULT_TIMEOUT));
    assert!(arr.is_empty(), "a timed-out wait writes nothing");
}
