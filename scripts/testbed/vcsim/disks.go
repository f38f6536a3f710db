package main

// Virtual disks with real content. vcsim creates each disk as two empty files; Ferry reads
// disks as a VMFS descriptor plus a flat extent, so every VM's first disk is given both.

import (
	"bufio"
	"bytes"
	"crypto/sha1"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// realizeDisks resizes every VM's first virtual disk to mib MiB, writes a VMFS descriptor
// into its backing file and makes its flat extent a sparse file of that size.
func realizeDisks(mib int64) error {
	capacity := mib << 20
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		var err error
		simulator.Map.WithLock(vm, func() {
			var disk *types.VirtualDisk
			for _, d := range vm.Config.Hardware.Device {
				if x, ok := d.(*types.VirtualDisk); ok {
					disk = x
					break
				}
			}
			if disk == nil {
				return
			}
			backing, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo)
			if !ok {
				return
			}
			info := backing.GetVirtualDeviceFileBackingInfo()
			var local string
			local, err = localPath(info.FileName, info.Datastore)
			if err != nil {
				return
			}
			disk.CapacityInKB = capacity >> 10
			disk.CapacityInBytes = capacity
			if d := disk.DeviceInfo.GetDescription(); d != nil {
				d.Summary = kbSummary(disk.CapacityInKB)
			}
			if err = writeDescriptor(local, capacity, vm.Config.Uuid+fmt.Sprint(disk.Key)); err != nil {
				return
			}
			err = os.Truncate(flatExtentPath(local), capacity)
		})
		if err != nil {
			return fmt.Errorf("%s: %v", vm.Name, err)
		}
	}
	return nil
}

// kbSummary is the device summary vSphere shows for a disk: "65,536 KB".
func kbSummary(kb int64) string {
	s := fmt.Sprint(kb)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s + " KB"
}

// writeDescriptor writes a monolithic VMFS descriptor whose one extent is the flat file
// named after the descriptor ("disk1.vmdk" -> "disk1-flat.vmdk"), as ESXi lays disks out.
func writeDescriptor(local string, capacity int64, seed string) error {
	sectors := capacity / 512
	cylinders := sectors / (255 * 63)
	if cylinders < 1 {
		cylinders = 1
	}
	sum := sha1.Sum([]byte(seed))
	var uuid []string
	for _, b := range sum[:16] {
		uuid = append(uuid, fmt.Sprintf("%02x", b))
	}
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n")
	fmt.Fprintf(&buf, "# Extent description\nRW %d VMFS \"%s\"\n\n", sectors, path.Base(flatExtentPath(local)))
	fmt.Fprintf(&buf, "# The Disk Data Base\n#DDB\n\n")
	fmt.Fprintf(&buf, "ddb.adapterType = \"lsilogic\"\n")
	fmt.Fprintf(&buf, "ddb.geometry.cylinders = \"%d\"\nddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n", cylinders)
	fmt.Fprintf(&buf, "ddb.longContentID = \"%x\"\n", sum[:16])
	fmt.Fprintf(&buf, "ddb.thinProvisioned = \"1\"\n")
	fmt.Fprintf(&buf, "ddb.uuid = \"%s\"\n", strings.Join(uuid, " "))
	fmt.Fprintf(&buf, "ddb.virtualHWVersion = \"13\"\n")
	return os.WriteFile(local, buf.Bytes(), 0600)
}

// flatExtentPath is where vcsim (and ESXi) put the flat extent of a descriptor.
func flatExtentPath(descriptor string) string {
	return strings.TrimSuffix(descriptor, ".vmdk") + "-flat.vmdk"
}

var extentLine = regexp.MustCompile(`^\s*(RW|RDONLY|NOACCESS)\s+\d+\s+\S+\s+"([^"]+)"`)

// extentPath reads the descriptor at local and returns the local path of its first extent,
// resolved next to the descriptor. A descriptor that names none (vcsim leaves the
// descriptors of disks it creates empty) means the conventional "-flat.vmdk" file.
func extentPath(local string) string {
	f, err := os.Open(local)
	if err != nil {
		return flatExtentPath(local)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for lines := 0; sc.Scan() && lines < 1000; lines++ {
		if m := extentLine.FindStringSubmatch(sc.Text()); m != nil {
			return filepath.Join(filepath.Dir(local), m[2])
		}
	}
	return flatExtentPath(local)
}

// localPath maps a datastore path ("[LocalDS_0] DC0_H0_VM0/disk1.vmdk") to a file of the
// local directory behind the datastore, preferring the datastore the backing names.
func localPath(name string, dsRef *types.ManagedObjectReference) (string, error) {
	var p object.DatastorePath
	if !p.FromString(name) {
		return "", fmt.Errorf("not a datastore path: %q", name)
	}
	var ds *simulator.Datastore
	if dsRef != nil {
		ds, _ = simulator.Map.Get(*dsRef).(*simulator.Datastore)
	}
	if ds == nil || ds.Name != p.Datastore {
		ds = nil
		for _, e := range simulator.Map.All("Datastore") {
			if e.Entity().Name == p.Datastore {
				ds = e.(*simulator.Datastore)
				break
			}
		}
	}
	if ds == nil {
		return "", fmt.Errorf("no datastore %q", p.Datastore)
	}
	return filepath.Join(ds.Info.GetDatastoreInfo().Url, p.Path), nil
}
