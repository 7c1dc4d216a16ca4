package main

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/protobuf/proto"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// checkpointFile is the kubelet's device-manager checkpoint name, in --checkpoint DIR.
const checkpointFile = "kubelet_internal_checkpoint"

// nodeWithoutTopology keys devices of unknown NUMA node in the checkpoint, as in the kubelet (we do not follow
// ListAndWatch, so every device is one).
const nodeWithoutTopology = -1

// The kubelet's checkpoint (pkg/kubelet/cm/devicemanager/checkpoint), field for field: Go's JSON of these structs
// is the file the kubelet writes, AllocResp being the marshalled AllocateResponse in base64.
type podDevicesEntry struct {
	PodUID        string
	ContainerName string
	ResourceName  string
	DeviceIDs     map[int64][]string
	AllocResp     []byte
}

type checkpointData struct {
	PodDeviceEntries  []podDevicesEntry
	RegisteredDevices map[string][]string
}

type checkpoint struct {
	Data     checkpointData
	Checksum uint64
}

// admitter admits one single-container pod per call, as the kubelet's device manager does for a pod asking for
// k devices of one resource: GetPreferredAllocation, Allocate, then the checkpoint on disk.
type admitter struct {
	client    pluginapi.DevicePluginClient
	devices   []string
	available map[string]bool
	sizes     []int
	resource  string
	dir       string
	timeout   time.Duration
}

func newAdmitter(client pluginapi.DevicePluginClient, devices []string, o *options) *admitter {
	available := make(map[string]bool, len(devices))
	for _, id := range devices {
		available[id] = true
	}
	return &admitter{client, devices, available, o.sizes, o.resource, o.checkpointDir, o.callTimeout}
}

// admit is admission number n. Each pod ends before the next begins, so every device is available every time.
func (a *admitter) admit(n int) error {
	size := a.sizes[n%len(a.sizes)]
	var preferred *pluginapi.PreferredAllocationResponse
	err := guarded(a.timeout, func(ctx context.Context) (err error) {
		preferred, err = a.client.GetPreferredAllocation(ctx, &pluginapi.PreferredAllocationRequest{
			ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{
				AvailableDeviceIDs:   a.devices,
				MustIncludeDeviceIDs: []string{},
				AllocationSize:       int32(size),
			}},
		})
		return err
	})
	if err != nil {
		// The kubelet fails the admission when GetPreferredAllocation fails (devicesToAllocate returns the error).
		return err
	}
	ids := a.choose(preferred, size)
	var allocated *pluginapi.AllocateResponse
	err = guarded(a.timeout, func(ctx context.Context) (err error) {
		allocated, err = a.client.Allocate(ctx, &pluginapi.AllocateRequest{
			ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids}},
		})
		return err
	})
	if err != nil {
		return err
	}
	if len(allocated.ContainerResponses) != 1 {
		return fmt.Errorf("Allocate answered %d container responses to 1 request", len(allocated.ContainerResponses))
	}
	return a.writeCheckpoint(fmt.Sprintf("gokubelet-pod-%d", n), ids, allocated.ContainerResponses[0])
}

// choose takes the preferred devices that are available, then makes up the size from the available ones in order:
// the kubelet fills in itself when a plugin prefers too few (or unknown) devices.
func (a *admitter) choose(preferred *pluginapi.PreferredAllocationResponse, size int) []string {
	chosen := make([]string, 0, size)
	taken := make(map[string]bool, size)
	take := func(id string) {
		if len(chosen) < size && a.available[id] && !taken[id] {
			chosen = append(chosen, id)
			taken[id] = true
		}
	}
	if len(preferred.ContainerResponses) > 0 {
		for _, id := range preferred.ContainerResponses[0].DeviceIDs {
			take(id)
		}
	}
	for _, id := range a.devices {
		take(id)
	}
	return chosen
}

// writeCheckpoint writes the checkpoint as the kubelet does after each container's allocation: the checksum over
// the data, the JSON, then the file store's atomic write.
func (a *admitter) writeCheckpoint(pod string, ids []string, response *pluginapi.ContainerAllocateResponse) error {
	// The kubelet keeps the plugin's answer as protobuf bytes (podDevices.toCheckpointData marshals it each time).
	resp, err := proto.Marshal(response)
	if err != nil {
		return err
	}
	data := checkpointData{
		PodDeviceEntries: []podDevicesEntry{{
			PodUID:        pod,
			ContainerName: "container-0",
			ResourceName:  a.resource,
			DeviceIDs:     map[int64][]string{nodeWithoutTopology: ids},
			AllocResp:     resp,
		}},
		RegisteredDevices: map[string][]string{a.resource: a.devices},
	}
	// The kubelet's checksum is FNV-32a over a deep print of the data (hashutil.DeepHashObject); FNV-32a over the
	// data's JSON costs about the same and is as good for telling a torn file.
	hashed, err := json.Marshal(data)
	if err != nil {
		return err
	}
	hash := fnv.New32a()
	hash.Write(hashed)
	blob, err := json.Marshal(checkpoint{Data: data, Checksum: uint64(hash.Sum32())})
	if err != nil {
		return err
	}
	return writeFileAtomically(a.dir, filepath.Join(a.dir, checkpointFile), blob)
}

// writeFileAtomically is the kubelet's file store write (pkg/kubelet/util/store/filestore.go): a temporary file
// named "." plus a random suffix in the same directory, written, fsynced, closed, then renamed over the target.
func writeFileAtomically(dir, path string, data []byte) (err error) {
	f, err := os.CreateTemp(dir, ".")
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	defer func() {
		if err != nil {
			os.Remove(f.Name())
			err = fmt.Errorf("checkpoint: %w", err)
		}
	}()
	if _, err = f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err = f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
