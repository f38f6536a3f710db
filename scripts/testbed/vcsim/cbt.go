package main

// Changed block tracking. vcsim 0.24 snapshots carry no changeId and it has no
// QueryChangedDiskAreas; here a snapshot of a VM with changeTrackingEnabled records a
// digest of every 64 KiB block of each of its disks' flat extents and gets a fresh
// changeId per disk, and QueryChangedDiskAreas compares two such recordings.

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strings"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
	vimxml "github.com/vmware/govmomi/vim25/xml"
)

const cbtBlock = 64 << 10

// diskState is a disk's content at the time a changeId was issued.
type diskState struct {
	sums [][sha256.Size]byte
	zero []bool
}

// diskID names a virtual disk: its VM and device key.
type diskID struct {
	vm  string
	key int32
}

type cbtStore struct {
	mu     sync.Mutex
	states map[diskID]map[string]*diskState // by changeId
	seq    map[diskID]int
	epoch  map[diskID]int // bumped by a CBT reset, which gives the disk a new changeId prefix
}

func newCBTStore() *cbtStore {
	return &cbtStore{
		states: map[diskID]map[string]*diskState{},
		seq:    map[diskID]int{},
		epoch:  map[diskID]int{},
	}
}

// newChangeID issues the next changeId of a disk, shaped like vSphere's:
// "52 66 xx xx xx xx xx xx-xx xx xx xx xx xx xx xx/<sequence>".
func (s *cbtStore) newChangeID(id diskID, st *diskState) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq[id]++
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s/%d/%d", id.vm, id.key, s.epoch[id])))
	b := append([]byte{0x52, 0x66}, sum[:14]...)
	var hex []string
	for _, x := range b {
		hex = append(hex, fmt.Sprintf("%02x", x))
	}
	changeID := fmt.Sprintf("%s-%s/%d", strings.Join(hex[:8], " "), strings.Join(hex[8:], " "), s.seq[id])
	if s.states[id] == nil {
		s.states[id] = map[string]*diskState{}
	}
	s.states[id][changeID] = st
	return changeID
}

func (s *cbtStore) lookup(id diskID, changeID string) *diskState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.states[id][changeID]
}

// forget drops every recorded changeId of the VM's disks; the changeIds issued afterwards
// have a new prefix, as after a CBT reset in vSphere.
func (s *cbtStore) forget(vm string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for id, states := range s.states {
		if id.vm == vm {
			n += len(states)
			delete(s.states, id)
			s.epoch[id]++
			s.seq[id] = 0
		}
	}
	return n
}

// resetVM is /ferry/reset-cbt: the VM's recorded changeIds are forgotten, so querying
// with one of them fails the way vSphere fails after a CBT reset.
func (s *cbtStore) resetVM(name string) (int, bool) {
	for _, e := range simulator.Map.All("VirtualMachine") {
		if e.Entity().Name == name {
			return s.forget(e.Reference().Value), true
		}
	}
	return 0, false
}

// switchOff turns changed block tracking off on the VM called name, as a vSphere admin
// unticking it (or a backup product resetting it) would, and forgets its change ids.
func (s *cbtStore) switchOff(name string) bool {
	for _, e := range simulator.Map.All("VirtualMachine") {
		if e.Entity().Name != name {
			continue
		}
		vm := e.(*simulator.VirtualMachine)
		off := false
		simulator.Map.WithLock(vm, func() { vm.Config.ChangeTrackingEnabled = &off })
		s.forget(vm.Reference().Value)
		return true
	}
	return false
}

// snapDisk is what the front layer needs of a virtual disk.
type snapDisk struct {
	key      int32
	fileName string
	ds       *types.ManagedObjectReference
	capacity int64
	changeID string
}

func disksOf(devices []types.BaseVirtualDevice) []snapDisk {
	var disks []snapDisk
	for _, d := range devices {
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		sd := snapDisk{key: disk.Key, capacity: disk.CapacityInBytes}
		if sd.capacity == 0 {
			sd.capacity = disk.CapacityInKB << 10
		}
		if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
			info := b.GetVirtualDeviceFileBackingInfo()
			sd.fileName = info.FileName
			sd.ds = info.Datastore
		}
		sd.changeID = backingChangeID(disk)
		disks = append(disks, sd)
	}
	return disks
}

func backingChangeID(disk *types.VirtualDisk) string {
	switch b := disk.Backing.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		return b.ChangeId
	case *types.VirtualDiskSeSparseBackingInfo:
		return b.ChangeId
	case *types.VirtualDiskSparseVer2BackingInfo:
		return b.ChangeId
	case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
		return b.ChangeId
	}
	return ""
}

// setChangeIDs sets the backing changeIds of the disks of devices, by device key.
func setChangeIDs(devices []types.BaseVirtualDevice, ids map[int32]string) {
	for _, d := range devices {
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		id, ok := ids[disk.Key]
		if !ok {
			continue
		}
		switch b := disk.Backing.(type) {
		case *types.VirtualDiskFlatVer2BackingInfo:
			b.ChangeId = id
		case *types.VirtualDiskSeSparseBackingInfo:
			b.ChangeId = id
		case *types.VirtualDiskSparseVer2BackingInfo:
			b.ChangeId = id
		case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
			b.ChangeId = id
		}
	}
}

// copyDevices deep-copies a device list (an XML round trip, as the simulator copies
// objects), so that a snapshot's devices stop sharing backings with the VM's.
func copyDevices(devices []types.BaseVirtualDevice) ([]types.BaseVirtualDevice, error) {
	b, err := vimxml.Marshal(types.ArrayOfVirtualDevice{VirtualDevice: devices})
	if err != nil {
		return nil, err
	}
	dec := vimxml.NewDecoder(bytes.NewReader(b))
	dec.TypeFunc = types.TypeFunc()
	var out types.ArrayOfVirtualDevice
	if err := dec.Decode(&out); err != nil {
		return nil, err
	}
	if len(out.VirtualDevice) != len(devices) {
		return nil, fmt.Errorf("copied %d devices of %d", len(out.VirtualDevice), len(devices))
	}
	return out.VirtualDevice, nil
}

// readState digests every 64 KiB block of a disk's flat extent; blocks past the end of
// the file, up to the disk's capacity, read as zeros.
func readState(d snapDisk) (*diskState, error) {
	local, err := localPath(d.fileName, d.ds)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(extentPath(local))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	blocks := int((d.capacity + cbtBlock - 1) / cbtBlock)
	st := &diskState{sums: make([][sha256.Size]byte, blocks), zero: make([]bool, blocks)}
	buf := make([]byte, cbtBlock)
	zeroSum := sha256.Sum256(make([]byte, cbtBlock))
	eof := false
	for i := 0; i < blocks; i++ {
		if eof {
			st.sums[i], st.zero[i] = zeroSum, true
			continue
		}
		n, err := io.ReadFull(f, buf)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			eof = true
		} else if err != nil {
			return nil, err
		}
		for j := n; j < len(buf); j++ {
			buf[j] = 0
		}
		st.sums[i] = sha256.Sum256(buf)
		st.zero[i] = st.sums[i] == zeroSum
	}
	return st, nil
}

// afterSnapshot runs once CreateSnapshot_Task has been answered (its task has already run:
// tasks are synchronous in vcsim 0.24).
func (s *cbtStore) afterSnapshot(vmRef, taskRef types.ManagedObjectReference) {
	task, ok := simulator.Map.Get(taskRef).(*simulator.Task)
	if !ok {
		return
	}
	var snapRef types.ManagedObjectReference
	var done bool
	simulator.Map.WithLock(task, func() {
		snapRef, done = task.Info.Result.(types.ManagedObjectReference)
		done = done && task.Info.State == types.TaskInfoStateSuccess
	})
	if !done {
		return
	}
	snap, ok := simulator.Map.Get(snapRef).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	if snap.Vm.Value != "" {
		vmRef = snap.Vm
	}

	// vcsim copies the VM's config into the snapshot shallowly: give the snapshot devices
	// of its own, whether or not it tracks changes, so that later changes to the VM's disks
	// do not show through it.
	var disks []snapDisk
	var tracking bool
	simulator.Map.WithLock(snap, func() {
		if snap.Config.Hardware.Device == nil {
			return
		}
		devices, err := copyDevices(snap.Config.Hardware.Device)
		if err != nil {
			log.Printf("copying the devices of %s: %v", snapRef.Value, err)
			return
		}
		snap.Config.Hardware.Device = devices
		tracking = snap.Config.ChangeTrackingEnabled != nil && *snap.Config.ChangeTrackingEnabled
		disks = disksOf(devices)
	})
	if !tracking {
		return
	}

	ids := map[int32]string{}
	for _, d := range disks {
		st, err := readState(d)
		if err != nil {
			log.Printf("change tracking of %s disk %d: %v", vmRef.Value, d.key, err)
			continue
		}
		ids[d.key] = s.newChangeID(diskID{vmRef.Value, d.key}, st)
	}
	if len(ids) == 0 {
		return
	}
	simulator.Map.WithLock(snap, func() {
		setChangeIDs(snap.Config.Hardware.Device, ids)
		simulator.Map.Update(snap, []types.PropertyChange{
			{Name: "config.hardware.device", Val: snap.Config.Hardware.Device},
		})
	})
	if vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine); ok {
		simulator.Map.WithLock(vm, func() {
			setChangeIDs(vm.Config.Hardware.Device, ids)
			simulator.Map.Update(vm, []types.PropertyChange{
				{Name: "config.hardware.device", Val: vm.Config.Hardware.Device},
			})
		})
	}
}

// afterReconfigure: turning change tracking off discards its data, as in vSphere.
func (s *cbtStore) afterReconfigure(vmRef types.ManagedObjectReference) {
	vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	var off bool
	simulator.Map.WithLock(vm, func() {
		off = vm.Config.ChangeTrackingEnabled == nil || !*vm.Config.ChangeTrackingEnabled
		if !off {
			return
		}
		ids := map[int32]string{}
		for _, d := range disksOf(vm.Config.Hardware.Device) {
			if d.changeID != "" {
				ids[d.key] = ""
			}
		}
		if len(ids) > 0 {
			setChangeIDs(vm.Config.Hardware.Device, ids)
			simulator.Map.Update(vm, []types.PropertyChange{
				{Name: "config.hardware.device", Val: vm.Config.Hardware.Device},
			})
		}
	})
	if off {
		s.forget(vmRef.Value)
	}
}

type queryChangedDiskAreas struct {
	This        moRef  `xml:"_this"`
	Snapshot    *moRef `xml:"snapshot"`
	DeviceKey   int32  `xml:"deviceKey"`
	StartOffset int64  `xml:"startOffset"`
	ChangeID    string `xml:"changeId"`
}

func (s *cbtStore) queryChangedDiskAreas(w http.ResponseWriter, body []byte) {
	var req queryChangedDiskAreas
	if _, err := decodeMethod(body, &req); err != nil {
		writeFault(w, "A specified parameter was not correct: "+err.Error(), "InvalidRequest", "")
		return
	}
	vmRef := req.This.ref()
	vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if !ok {
		managedObjectNotFound(w, vmRef)
		return
	}

	// The disk as the snapshot saw it, or as it is now when no snapshot is named.
	var disks []snapDisk
	if req.Snapshot != nil {
		snapRef := req.Snapshot.ref()
		snap, ok := simulator.Map.Get(snapRef).(*simulator.VirtualMachineSnapshot)
		if !ok {
			managedObjectNotFound(w, snapRef)
			return
		}
		var owner types.ManagedObjectReference
		simulator.Map.WithLock(snap, func() {
			owner = snap.Vm
			disks = disksOf(snap.Config.Hardware.Device)
		})
		if owner != vmRef {
			invalidArgument(w, "snapshot", "the snapshot does not belong to the virtual machine")
			return
		}
	} else {
		simulator.Map.WithLock(vm, func() { disks = disksOf(vm.Config.Hardware.Device) })
	}
	var disk *snapDisk
	for i := range disks {
		if disks[i].key == req.DeviceKey {
			disk = &disks[i]
		}
	}
	if disk == nil {
		invalidArgument(w, "deviceKey", fmt.Sprintf("no virtual disk with device key %d", req.DeviceKey))
		return
	}
	id := diskID{vmRef.Value, disk.key}
	current := s.lookup(id, disk.changeID)
	if disk.changeID == "" || current == nil {
		invalidArgument(w, "changeId", "snapshot has no change tracking information")
		return
	}
	if req.Snapshot == nil {
		// Without a snapshot the disk's present content is compared.
		st, err := readState(*disk)
		if err != nil {
			writeFault(w, "Error caused by file "+disk.fileName+": "+err.Error(), "FileFault", "<file>"+esc(disk.fileName)+"</file>")
			return
		}
		current = st
	}
	if req.StartOffset < 0 || req.StartOffset > disk.capacity {
		invalidArgument(w, "startOffset", "startOffset is beyond the end of the disk")
		return
	}

	var changed func(i int) bool
	if req.ChangeID == "*" {
		changed = func(i int) bool { return !current.zero[i] }
	} else {
		since := s.lookup(id, req.ChangeID)
		if since == nil {
			writeFault(w, fmt.Sprintf("Error caused by file %s: changeId %s is invalid for this disk (it was never issued or change tracking was reset)", disk.fileName, req.ChangeID),
				"FileFault", "<file>"+esc(disk.fileName)+"</file>")
			return
		}
		changed = func(i int) bool {
			if i >= len(since.sums) {
				return !current.zero[i]
			}
			return since.sums[i] != current.sums[i]
		}
	}

	var out strings.Builder
	fmt.Fprintf(&out, `<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>%d</startOffset><length>%d</length>`,
		req.StartOffset, disk.capacity-req.StartOffset)
	emit := func(start, end int64) {
		if start < req.StartOffset {
			start = req.StartOffset
		}
		if end > disk.capacity {
			end = disk.capacity
		}
		if end > start {
			fmt.Fprintf(&out, `<changedArea><start>%d</start><length>%d</length></changedArea>`, start, end-start)
		}
	}
	runStart := int64(-1)
	for i := range current.sums {
		if changed(i) {
			if runStart < 0 {
				runStart = int64(i) * cbtBlock
			}
			continue
		}
		if runStart >= 0 {
			emit(runStart, int64(i)*cbtBlock)
			runStart = -1
		}
	}
	if runStart >= 0 {
		emit(runStart, int64(len(current.sums))*cbtBlock)
	}
	out.WriteString(`</returnval></QueryChangedDiskAreasResponse>`)
	writeResponse(w, out.String())
}

func invalidArgument(w http.ResponseWriter, property, msg string) {
	writeFault(w, msg, "InvalidArgument", "<invalidProperty>"+esc(property)+"</invalidProperty>")
}
