// Command gokubelet is the kubelet's device-manager client reduced to a load generator: it dials a device plugin's
// unix socket as the kubelet does and times Allocate, GetPreferredAllocation or whole admissions, with the same
// grpc-go stack and generated typed stubs, so the figures compare with the kubelet's own.
//
//	gokubelet allocate  --target NAME=SOCKET ... --requests FILE [--calls N --callers C --block B --warmup W]
//	gokubelet preferred --target NAME=SOCKET ... --requests FILE [...]
//	gokubelet admission --target NAME=SOCKET ... --devices FILE --sizes 1,2,1,4 --checkpoint DIR [--resource RES ...]
//
// It prints one JSON document on stdout; see report. Failed calls are data (exit 0); bad arguments or a socket
// that does not answer within --dial-timeout exit 2 with a message on stderr.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// processStart is the origin of every started_s: time.Now carries the monotonic clock, so differences from it are
// monotonic too.
var processStart = time.Now()

const usage = `usage:
  gokubelet allocate  --target NAME=SOCKET [--target ...] --requests FILE [options]
  gokubelet preferred --target NAME=SOCKET [--target ...] --requests FILE [options]
  gokubelet admission --target NAME=SOCKET [--target ...] --devices FILE --sizes 1,2,4 --checkpoint DIR [options]
Run "gokubelet MODE -h" for the options.`

type target struct{ name, socket string }

// targetFlags collects repeated --target NAME=SOCKET, in order: the order is the first round's.
type targetFlags []target

func (t *targetFlags) String() string { return fmt.Sprint(*t) }

func (t *targetFlags) Set(value string) error {
	name, socket, ok := strings.Cut(value, "=")
	if !ok || name == "" || socket == "" {
		return fmt.Errorf("want NAME=SOCKET, got %q", value)
	}
	for _, existing := range *t {
		if existing.name == name {
			return fmt.Errorf("target %q given twice", name)
		}
	}
	*t = append(*t, target{name, socket})
	return nil
}

type options struct {
	mode          string
	targets       targetFlags
	requestsFile  string
	devicesFile   string
	sizes         []int
	calls         int
	callers       int
	block         int
	warmup        int
	checkpointDir string
	resource      string
	dialTimeout   time.Duration
	callTimeout   time.Duration
}

func parseArgs(args []string) (*options, error) {
	if len(args) == 0 {
		return nil, errors.New("no mode given\n" + usage)
	}
	o := &options{mode: args[0]}
	switch o.mode {
	case "allocate", "preferred", "admission":
	case "-h", "--help", "help":
		fmt.Fprintln(os.Stderr, usage)
		return nil, flag.ErrHelp
	default:
		return nil, fmt.Errorf("unknown mode %q\n%s", o.mode, usage)
	}
	fs := flag.NewFlagSet("gokubelet "+o.mode, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	var sizes string
	fs.Var(&o.targets, "target", "NAME=SOCKET: a plugin socket to call, under a name for the report (repeatable)")
	fs.StringVar(&o.requestsFile, "requests", "", "allocate, preferred: requests, each prefixed with its varint length")
	fs.StringVar(&o.devicesFile, "devices", "", "admission: the available device IDs, one per line")
	fs.StringVar(&sizes, "sizes", "", "admission: devices per pod, cycled, e.g. 1,2,1,4")
	fs.StringVar(&o.checkpointDir, "checkpoint", "", "admission: directory of kubelet_internal_checkpoint")
	fs.StringVar(&o.resource, "resource", "nvidia.com/gpu", "admission: the resource name in the checkpoint")
	fs.IntVar(&o.calls, "calls", 1000, "recorded calls per target")
	fs.IntVar(&o.callers, "callers", 1, "concurrent closed-loop callers (admission: 1, the kubelet admits serially)")
	fs.IntVar(&o.block, "block", 100, "calls per target per round; the targets' order rotates each round")
	fs.IntVar(&o.warmup, "warmup", 100, "unrecorded calls per target before the rounds")
	fs.DurationVar(&o.dialTimeout, "dial-timeout", 10*time.Second, "how long to wait for each socket to answer")
	fs.DurationVar(&o.callTimeout, "timeout", 30*time.Second,
		"client-side give-up time per RPC, never sent to the plugin (the kubelet sends no deadline); 0: none")
	if err := fs.Parse(args[1:]); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	switch {
	case len(o.targets) == 0:
		return nil, errors.New("at least one --target NAME=SOCKET is needed")
	case o.calls < 1 || o.callers < 1 || o.block < 1 || o.warmup < 0:
		return nil, errors.New("--calls, --callers and --block must be at least 1, --warmup at least 0")
	case o.dialTimeout <= 0 || o.callTimeout < 0:
		return nil, errors.New("--dial-timeout must be positive and --timeout not negative")
	}
	if o.mode != "admission" {
		if o.requestsFile == "" {
			return nil, fmt.Errorf("%s needs --requests FILE", o.mode)
		}
		return o, nil
	}
	if o.devicesFile == "" || sizes == "" || o.checkpointDir == "" {
		return nil, errors.New("admission needs --devices FILE, --sizes LIST and --checkpoint DIR")
	}
	if o.callers != 1 {
		return nil, errors.New("admission runs one caller: the kubelet admits pods one at a time")
	}
	for _, field := range strings.Split(sizes, ",") {
		size, err := strconv.Atoi(strings.TrimSpace(field))
		if err != nil || size < 1 {
			return nil, fmt.Errorf("--sizes: %q is not a positive integer", field)
		}
		o.sizes = append(o.sizes, size)
	}
	if info, err := os.Stat(o.checkpointDir); err != nil || !info.IsDir() {
		return nil, fmt.Errorf("--checkpoint %s is not a directory", o.checkpointDir)
	}
	return o, nil
}

// readDelimited splits a file of messages each prefixed with its length as a protobuf varint (Java's
// writeDelimitedTo, Go's protodelim).
func readDelimited(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var messages [][]byte
	for len(data) > 0 {
		size, prefix := binary.Uvarint(data)
		if prefix <= 0 || size > uint64(len(data)-prefix) {
			return nil, fmt.Errorf("%s: bad or truncated length prefix of message %d", path, len(messages))
		}
		end := prefix + int(size)
		messages = append(messages, data[prefix:end])
		data = data[end:]
	}
	if len(messages) == 0 {
		return nil, fmt.Errorf("%s holds no messages", path)
	}
	return messages, nil
}

// readRequests decodes the file's messages into typed requests (*T) once; grpc-go's codec marshals them again on
// every call, as it does the kubelet's.
func readRequests[T any, M interface {
	*T
	proto.Message
}](path string) ([]M, error) {
	raw, err := readDelimited(path)
	if err != nil {
		return nil, err
	}
	requests := make([]M, len(raw))
	for i, data := range raw {
		requests[i] = new(T)
		if err := proto.Unmarshal(data, requests[i]); err != nil {
			return nil, fmt.Errorf("%s: message %d: %v", path, i, err)
		}
	}
	return requests, nil
}

func readDevices(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var devices []string
	for _, line := range strings.Split(string(data), "\n") {
		if id := strings.TrimSpace(line); id != "" {
			devices = append(devices, id)
		}
	}
	if len(devices) == 0 {
		return nil, fmt.Errorf("%s lists no devices", path)
	}
	return devices, nil
}

// dial connects as the kubelet's device manager does (pkg/kubelet/cm/devicemanager/plugin/v1beta1/client.go):
// insecure, authority "localhost", a plain unix dialer, blocking until connected. One connection per target, kept
// for every call.
func dial(socket string, timeout time.Duration) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return grpc.DialContext(ctx, socket,
		grpc.WithAuthority("localhost"),
		// grpc-go 1.33 predates credentials/insecure; WithInsecure is the same thing there.
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
	)
}

// inputs are the files' contents, read (and checked) before any socket is dialled.
type inputs struct {
	allocate  []*pluginapi.AllocateRequest
	preferred []*pluginapi.PreferredAllocationRequest
	devices   []string
}

func readInputs(o *options) (in inputs, err error) {
	switch o.mode {
	case "allocate":
		in.allocate, err = readRequests[pluginapi.AllocateRequest](o.requestsFile)
	case "preferred":
		in.preferred, err = readRequests[pluginapi.PreferredAllocationRequest](o.requestsFile)
	case "admission":
		if in.devices, err = readDevices(o.devicesFile); err != nil {
			return in, err
		}
		for _, size := range o.sizes {
			if size > len(in.devices) {
				return in, fmt.Errorf("--sizes asks for %d devices, --devices lists %d", size, len(in.devices))
			}
		}
	}
	return in, err
}

// callFor is the target's call for the mode.
func callFor(o *options, in inputs, conn *grpc.ClientConn) callFn {
	client := pluginapi.NewDevicePluginClient(conn)
	switch o.mode {
	case "allocate":
		return unary(o.callTimeout, in.allocate, client.Allocate)
	case "preferred":
		return unary(o.callTimeout, in.preferred, client.GetPreferredAllocation)
	default:
		return newAdmitter(client, in.devices, o).admit
	}
}

// unary is one typed RPC of the client: call n sends request n modulo their number, guarded by the stall limit.
func unary[Req, Resp any](
	limit time.Duration, requests []Req, rpc func(context.Context, Req, ...grpc.CallOption) (Resp, error),
) callFn {
	return func(n int) error {
		return guarded(limit, func(ctx context.Context) error {
			_, err := rpc(ctx, requests[n%len(requests)])
			return err
		})
	}
}

// report is the one JSON document printed on stdout.
type report struct {
	Mode    string             `json:"mode"`
	Targets map[string]*result `json:"targets"`
	Go      string             `json:"go"`
	GRPC    string             `json:"grpc"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "gokubelet: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	o, err := parseArgs(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fail("%v", err)
	}
	in, err := readInputs(o)
	if err != nil {
		fail("%v", err)
	}
	names := make([]string, len(o.targets))
	calls := make(map[string]callFn, len(o.targets))
	for i, t := range o.targets {
		conn, err := dial(t.socket, o.dialTimeout)
		if err != nil {
			fail("cannot reach target %s at %s within %s: %v", t.name, t.socket, o.dialTimeout, err)
		}
		defer conn.Close()
		names[i] = t.name
		calls[t.name] = callFor(o, in, conn)
	}
	out := report{
		Mode:    o.mode,
		Targets: interleave(names, calls, o.calls, o.callers, o.block, o.warmup),
		Go:      runtime.Version(),
		GRPC:    grpc.Version,
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("writing the report: %v", err)
	}
}
