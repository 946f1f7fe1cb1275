// kvmi-client: an example Go client of kvmid's API (kvmi.v1.Introspection).
//
// It connects to kvmid (unix:///run/kvmid/api.sock, unix:/path, or host:port), lists the
// guests, then either
//   - streams events (StreamEvents, observe-only) through a filter and prints them, or
//   - with --attach, becomes a remote handler (Attach): it claims blocking events and answers
//     each with a verdict: KEEP_OLD for writes to LSTAR (the syscall entry), CONTINUE otherwise;
//     before each verdict it reads the 16 instruction bytes at the event's RIP (ReadVirtual as an
//     inline command on the same stream, in the event's vCPU address space, while it waits) and
//     prints them with the verdict (--rip_bytes=false: no read), or
//   - with --dump_vm and --dump_out, writes --dump_size bytes of the guest's memory from
//     --dump_gpa into a file (ReadPhysicalStream through kvmimem.Dump; zero pages become holes).
//
// Build (a Go module, offline against Debian's Go packages, stubs generated from proto/kvmi/v1):
//
//	bash clients/go/build.sh OUT_DIR
//	OUT_DIR/kvmi-client --addr=unix:///run/kvmid/api.sock --events=EVENT_TYPE_MSR,EVENT_TYPE_CR --count=20
//
// Exit status: 0 when --count events (or verdicts) were printed, or the stream/time limit ended
// normally; 1 on an RPC error; 2 on bad flags; 3 with --attach when kvmid does not implement it.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	kvmiv1 "github.com/kvmid/kvmid/clients/go/kvmi/v1"
	"github.com/kvmid/kvmid/clients/go/kvmimem"
)

const msrLSTAR = 0xC0000082

var (
	addr      = flag.String("addr", "unix:///run/kvmid/api.sock", "kvmid API: unix:///PATH, unix:PATH or HOST:PORT")
	listOnly  = flag.Bool("list_only", false, "list the guests and exit")
	listPols  = flag.Bool("list_policies", false, "list the guests, then every policy (all pages), and exit")
	pageSize  = flag.Uint("policies_page_size", 0, "with --list_policies: policies per ListPolicies call (0: kvmid's limit)")
	waitVMs   = flag.Int("wait_vms", 0, "before streaming, poll ListVMs until at least this many guests are hooked")
	vms       = flag.String("vms", "", "comma-separated guest UUIDs or names (empty: every guest)")
	events    = flag.String("events", "", "comma-separated event types, e.g. EVENT_TYPE_MSR,CR,PF (empty: every type)")
	vcpus     = flag.String("vcpus", "", "comma-separated vCPU indexes (empty: every vCPU)")
	msrs      = flag.String("msrs", "", "comma-separated MSR indexes for MSR events, e.g. 0xc0000082")
	regs      = flag.Bool("registers", false, "include the vCPU registers with each event")
	count     = flag.Int("count", 0, "stop after this many events (0: no limit)")
	timeout   = flag.Duration("timeout", 0, "stop after this long (0: no limit)")
	attach    = flag.Bool("attach", false, "answer verdicts through Attach instead of observing with StreamEvents")
	handlerID = flag.String("handler_id", "go-example", "with --attach: the handler id (Event.decided_by = handler:ID)")
	deadline  = flag.Uint("deadline_ms", 0, "with --attach: how long kvmid waits for each verdict (0: its default)")
	armMsrs   = flag.String("arm_msrs", "", "with --attach: MSRs to arm (CONTROL_MSR) for the claimed guests")
	maxBatch  = flag.Uint("max_batch", 0, "with --attach: kvmid may send up to this many waiting events in one message (Claim.max_batch, at most 256); without --rip_bytes their verdicts go back as one VerdictBatch")
	ripBytes  = flag.Bool("rip_bytes", true, "with --attach: read and print the 16 bytes at each event's RIP (an inline ReadVirtual) before its verdict")
	dumpVM    = flag.String("dump_vm", "", "write this guest's memory to --dump_out and exit")
	dumpOut   = flag.String("dump_out", "", "with --dump_vm: the file to write")
	dumpGpa   = flag.Uint64("dump_gpa", 0, "with --dump_vm: the first guest-physical address")
	dumpSize  = flag.Uint64("dump_size", 16<<20, "with --dump_vm: bytes to write")
	// Mutual TLS for HOST:PORT targets (kvmid's --api_tls_*); the UNIX socket needs none.
	caFile     = flag.String("ca", os.Getenv("KVMID_CA"), "TCP: PEM CA bundle that issued kvmid's certificate ($KVMID_CA)")
	certFile   = flag.String("cert", os.Getenv("KVMID_CERT"), "TCP: PEM client certificate ($KVMID_CERT)")
	keyFile    = flag.String("key", os.Getenv("KVMID_KEY"), "TCP: PEM private key of --cert ($KVMID_KEY)")
	serverName = flag.String("server_name", "", "TCP: name to check kvmid's certificate against (default: the host of --addr)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kvmi-client:", err)
		if s, ok := status.FromError(err); ok && s.Code() == codes.Unimplemented && *attach {
			os.Exit(3)
		}
		os.Exit(1)
	}
}

// transportCredentials: mutual TLS when --ca/--cert/--key are given, else plaintext (the UNIX
// socket, or kvmid's --api_tcp_insecure_plaintext on loopback).
func transportCredentials() (grpc.DialOption, error) {
	if *caFile == "" && *certFile == "" && *keyFile == "" {
		return grpc.WithInsecure(), nil
	}
	config := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: *serverName}
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			return nil, fmt.Errorf("--ca: %v", err)
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--ca %s: no PEM certificate in it", *caFile)
		}
	}
	if (*certFile == "") != (*keyFile == "") {
		return nil, fmt.Errorf("--cert and --key go together")
	}
	if *certFile != "" {
		pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			return nil, fmt.Errorf("--cert/--key: %v", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(config)), nil
}

// dial understands unix:///abs/path and unix:path itself (gRPC-Go 1.33 has no unix resolver).
func dial(ctx context.Context, target string) (*grpc.ClientConn, error) {
	security, err := transportCredentials()
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{security, grpc.WithBlock()}
	path := ""
	switch {
	case strings.HasPrefix(target, "unix://"):
		path = strings.TrimPrefix(target, "unix://")
	case strings.HasPrefix(target, "unix:"):
		path = strings.TrimPrefix(target, "unix:")
	}
	if path != "" {
		opts = append(opts, grpc.WithAuthority("localhost"),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			}))
		target = "passthrough:///" + path
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return grpc.DialContext(dctx, target, opts...)
}

func run() error {
	eventTypes, err := parseEventTypes(*events)
	if err != nil {
		return err
	}
	vcpuList, err := parseUints(*vcpus)
	if err != nil {
		return fmt.Errorf("--vcpus: %v", err)
	}
	msrList, err := parseUints(*msrs)
	if err != nil {
		return fmt.Errorf("--msrs: %v", err)
	}
	armList, err := parseUints(*armMsrs)
	if err != nil {
		return fmt.Errorf("--arm_msrs: %v", err)
	}

	ctx := context.Background()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	conn, err := dial(ctx, *addr)
	if err != nil {
		return fmt.Errorf("connect %s: %v", *addr, err)
	}
	defer conn.Close()
	client := kvmiv1.NewIntrospectionClient(conn)

	if err := listVMs(ctx, client); err != nil {
		return err
	}
	if *listPols {
		return listPolicies(ctx, client)
	}
	if *listOnly {
		return nil
	}
	if *dumpVM != "" {
		return dump(ctx, client)
	}
	if *attach {
		return runAttach(ctx, client, eventTypes, armList)
	}
	return streamEvents(ctx, client, eventTypes, vcpuList, msrList)
}

// dump writes guest memory into --dump_out with kvmimem.Dump and prints a summary.
func dump(ctx context.Context, client kvmiv1.IntrospectionClient) error {
	if *dumpOut == "" {
		return fmt.Errorf("--dump_out: required with --dump_vm")
	}
	f, err := os.Create(*dumpOut)
	if err != nil {
		return err
	}
	defer f.Close()
	stats, err := kvmimem.Dump(ctx, client, *dumpVM, *dumpGpa, *dumpSize, f, nil)
	if err != nil {
		return fmt.Errorf("ReadPhysicalStream: %v", err)
	}
	if err := f.Truncate(int64(*dumpSize)); err != nil { // a dump ending in zero pages
		return err
	}
	fmt.Printf("dumped %d bytes of %s from gpa %#x: %.0f MiB/s, %d chunks, %d zero pages not sent\n",
		stats.Bytes, *dumpVM, *dumpGpa, stats.MiBPerSecond(), stats.Chunks, stats.ZeroPages)
	return f.Close()
}

// listPolicies prints every policy, following ListPolicies' pages (each response fits a client's
// default 4 MiB message; next_page_token is empty on the last one).
func listPolicies(ctx context.Context, client kvmiv1.IntrospectionClient) error {
	req := &kvmiv1.ListPoliciesRequest{PageSize: uint32(*pageSize)}
	pages, count := 0, 0
	for {
		resp, err := client.ListPolicies(ctx, req)
		if err != nil {
			return fmt.Errorf("ListPolicies (page %d): %v", pages+1, err)
		}
		pages++
		for _, s := range resp.GetPolicies() {
			count++
			fmt.Printf("policy %s mode=%s origin=%s etag=%s hits=%d enforced=%d\n",
				s.GetPolicy().GetName(), s.GetPolicy().GetMode(), s.GetOrigin(), s.GetEtag(),
				s.GetCounters().GetHits(), s.GetCounters().GetEnforced())
		}
		if resp.GetNextPageToken() == "" {
			break
		}
		req.PageToken = resp.GetNextPageToken()
	}
	fmt.Printf("policies: %d in %d page(s)\n", count, pages)
	return nil
}

// allVMs returns every guest, following ListVMs' pages (sorted by UUID; next_page_token is
// empty on the last one).
func allVMs(ctx context.Context, client kvmiv1.IntrospectionClient) ([]*kvmiv1.VM, error) {
	var vms []*kvmiv1.VM
	req := &kvmiv1.ListVMsRequest{}
	for {
		resp, err := client.ListVMs(ctx, req)
		if err != nil {
			return nil, fmt.Errorf("ListVMs: %v", err)
		}
		vms = append(vms, resp.GetVms()...)
		if resp.GetNextPageToken() == "" {
			return vms, nil
		}
		req.PageToken = resp.GetNextPageToken()
	}
}

func listVMs(ctx context.Context, client kvmiv1.IntrospectionClient) error {
	for {
		vms, err := allVMs(ctx, client)
		if err != nil {
			return err
		}
		hooked := 0
		for _, vm := range vms {
			if vm.GetState() == kvmiv1.VMState_VM_STATE_HOOKED {
				hooked++
			}
		}
		if hooked >= *waitVMs {
			fmt.Printf("vms: %d (%d hooked)\n", len(vms), hooked)
			for _, vm := range vms {
				fmt.Printf("vm %s name=%s state=%s vcpus=%d kvmi_version=%d events=%d transport=%s\n",
					vm.GetUuid(), vm.GetName(), vm.GetState(), vm.GetVcpuCount(), vm.GetKvmiVersion(),
					vm.GetEvents(), vm.GetTransport())
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %d hooked guests (have %d): %v", *waitVMs, hooked, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func streamEvents(ctx context.Context, client kvmiv1.IntrospectionClient, types []kvmiv1.EventType,
	vcpuList, msrList []uint32) error {
	// One allow filter (any of several may match; deny filters leave events out).
	allow := &kvmiv1.EventFilter{
		Vms:    splitList(*vms),
		Events: types,
		Vcpus:  vcpuList,
		Msrs:   msrList,
	}
	req := &kvmiv1.StreamEventsRequest{
		Allow:            []*kvmiv1.EventFilter{allow},
		IncludeRegisters: *regs,
	}
	stream, err := client.StreamEvents(ctx, req)
	if err != nil {
		return fmt.Errorf("StreamEvents: %v", err)
	}
	fmt.Printf("streaming events (filter: vms=%v events=%v vcpus=%v msrs=%v)\n",
		allow.Vms, allow.Events, allow.Vcpus, allow.Msrs)
	printed := 0
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			fmt.Printf("stream ended after %d events\n", printed)
			return nil
		}
		if err != nil {
			if ctx.Err() != nil { // our own --timeout
				fmt.Printf("time limit reached after %d events\n", printed)
				return nil
			}
			return fmt.Errorf("StreamEvents: %v", err)
		}
		switch m := msg.GetMessage().(type) {
		case *kvmiv1.StreamEventsResponse_Event:
			fmt.Println(formatEvent(m.Event))
			printed++
			if *count > 0 && printed >= *count {
				fmt.Printf("done: %d events\n", printed)
				return nil
			}
		case *kvmiv1.StreamEventsResponse_Dropped:
			fmt.Printf("dropped %d events (%d in total)\n", m.Dropped.GetDropped(), m.Dropped.GetDroppedTotal())
		case *kvmiv1.StreamEventsResponse_Heartbeat:
			// A quiet stream is alive (kvmid sends one after its heartbeat interval).
			fmt.Printf("heartbeat at %s (last event looked at: %d)\n",
				m.Heartbeat.GetTime().AsTime().Format(time.RFC3339), m.Heartbeat.GetLastEventId())
		}
	}
}

// decide is the example handler's policy: writes to LSTAR keep their old value (a rootkit
// hooking the syscall entry gets nowhere), everything else goes on.
func decide(ev *kvmiv1.Event) (kvmiv1.Action, string) {
	if ev.GetType() == kvmiv1.EventType_EVENT_TYPE_MSR && ev.GetMsr().GetMsr() == msrLSTAR {
		return kvmiv1.Action_ACTION_KEEP_OLD, "LSTAR write refused"
	}
	return kvmiv1.Action_ACTION_CONTINUE, ""
}

func runAttach(ctx context.Context, client kvmiv1.IntrospectionClient, types []kvmiv1.EventType,
	armList []uint32) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.Attach(ctx)
	if err != nil {
		return fmt.Errorf("Attach: %v", err)
	}
	claim := &kvmiv1.Claim{
		HandlerId:  *handlerID,
		Vms:        splitList(*vms),
		Events:     types,
		DeadlineMs: uint32(*deadline),
		Fallback:   kvmiv1.Action_ACTION_CONTINUE,
		ArmMsrs:    armList,
		MaxBatch:   uint32(*maxBatch),
	}
	if len(armList) > 0 {
		claim.ArmEvents = []kvmiv1.EventType{kvmiv1.EventType_EVENT_TYPE_MSR}
	}
	if err := stream.Send(&kvmiv1.AttachRequest{Message: &kvmiv1.AttachRequest_Claim{Claim: claim}}); err != nil {
		return fmt.Errorf("Attach: sending the claim: %v", streamError(stream, err))
	}
	answered := 0
	var nextCommand uint64
	pending := map[uint64]*kvmiv1.Event{} // inline ReadVirtual id -> the event waiting for it
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			fmt.Printf("attach stream ended after %d verdicts\n", answered)
			return nil
		}
		if err != nil {
			if ctx.Err() != nil {
				fmt.Printf("time limit reached after %d verdicts\n", answered)
				return nil
			}
			return fmt.Errorf("Attach: %v", err)
		}
		switch m := resp.GetMessage().(type) {
		case *kvmiv1.AttachResponse_Claimed:
			fmt.Printf("claimed: owner=%s\n", m.Claimed.GetOwner())
			continue
		case *kvmiv1.AttachResponse_Error:
			fmt.Printf("verdict error: event %d: %s\n", m.Error.GetEventId(), m.Error.GetMessage())
			continue
		case *kvmiv1.AttachResponse_Event, *kvmiv1.AttachResponse_Events:
			evs := []*kvmiv1.Event{resp.GetEvent()}
			if batch := resp.GetEvents(); batch != nil {
				evs = batch.GetEvents()
				fmt.Printf("batch: %d events\n", len(evs))
			}
			if !*ripBytes {
				if err := answerAll(stream, evs); err != nil {
					return err
				}
				answered += len(evs)
				break
			}
			// The bytes at RIP first: an inline ReadVirtual in each event's address space; its
			// verdict follows the result (the vCPU waits meanwhile, within the deadline).
			for _, ev := range evs {
				nextCommand++
				pending[nextCommand] = ev
				cmd := &kvmiv1.Command{Id: nextCommand, Request: &kvmiv1.Command_ReadVirtual{
					ReadVirtual: &kvmiv1.ReadVirtualRequest{
						Vm: ev.GetVmUuid(), Space: &kvmiv1.ReadVirtualRequest_Vcpu{Vcpu: ev.GetVcpu()},
						Gva: ev.GetRip(), Size: ripByteCount}}}
				if err := stream.Send(&kvmiv1.AttachRequest{Message: &kvmiv1.AttachRequest_Command{Command: cmd}}); err != nil {
					return fmt.Errorf("Attach: sending ReadVirtual: %v", streamError(stream, err))
				}
			}
			continue
		case *kvmiv1.AttachResponse_CommandResult:
			result := m.CommandResult
			ev, ok := pending[result.GetId()]
			if !ok {
				continue
			}
			delete(pending, result.GetId())
			if err := answer(stream, ev, formatRipBytes(result)); err != nil {
				return err
			}
			answered++
		default:
			continue
		}
		if *count > 0 && answered >= *count {
			fmt.Printf("done: %d verdicts\n", answered)
			return detach(stream, cancel)
		}
	}
}

// ripByteCount: the longest x86 instruction is 15 bytes.
const ripByteCount = 16

// answer sends the verdict for ev and prints it (with the bytes at RIP when read).
func answer(stream kvmiv1.Introspection_AttachClient, ev *kvmiv1.Event, code string) error {
	verdict, line := judge(ev, code)
	if err := stream.Send(&kvmiv1.AttachRequest{Message: &kvmiv1.AttachRequest_Verdict{Verdict: verdict}}); err != nil {
		return fmt.Errorf("Attach: sending a verdict: %v", streamError(stream, err))
	}
	fmt.Println(line)
	return nil
}

// answerAll answers evs: one Verdict message for one event, else one VerdictBatch (kvmid
// applies each verdict as if it came alone).
func answerAll(stream kvmiv1.Introspection_AttachClient, evs []*kvmiv1.Event) error {
	if len(evs) == 1 {
		return answer(stream, evs[0], "")
	}
	batch := &kvmiv1.VerdictBatch{}
	lines := make([]string, 0, len(evs))
	for _, ev := range evs {
		verdict, line := judge(ev, "")
		batch.Verdicts = append(batch.Verdicts, verdict)
		lines = append(lines, line)
	}
	if err := stream.Send(&kvmiv1.AttachRequest{Message: &kvmiv1.AttachRequest_Verdicts{Verdicts: batch}}); err != nil {
		return fmt.Errorf("Attach: sending %d verdicts: %v", len(evs), streamError(stream, err))
	}
	fmt.Println(strings.Join(lines, "\n"))
	return nil
}

// judge: ev's verdict, and the line that says it (with the bytes at RIP when read).
func judge(ev *kvmiv1.Event, code string) (*kvmiv1.Verdict, string) {
	action, why := decide(ev)
	line := fmt.Sprintf("verdict %s for %s", action, formatEvent(ev))
	if code != "" {
		line += " " + code
	}
	if why != "" {
		line += " (" + why + ")"
	}
	return &kvmiv1.Verdict{EventId: ev.GetId(), Action: action}, line
}

// formatRipBytes: "code=0f30..." with "??" for bytes on a page that was not read, and why.
func formatRipBytes(result *kvmiv1.CommandResult) string {
	if result.GetCode() != 0 {
		return fmt.Sprintf("code=error(%s)", result.GetMessage())
	}
	r := result.GetReadVirtual()
	var b strings.Builder
	b.WriteString("code=")
	data := r.GetData()
	offset := 0
	var whys []string
	for _, page := range r.GetPages() {
		for i := 0; i < int(page.GetSize()) && offset+i < len(data); i++ {
			if page.GetRead() {
				fmt.Fprintf(&b, "%02x", data[offset+i])
			} else {
				b.WriteString("??")
			}
		}
		if !page.GetRead() {
			whys = append(whys, fmt.Sprintf("%#x: %s", page.GetGva(), page.GetWhy()))
		}
		offset += int(page.GetSize())
	}
	if len(whys) > 0 {
		fmt.Fprintf(&b, " [not read: %s]", strings.Join(whys, "; "))
	}
	return b.String()
}

// detach half-closes the stream and waits (at most 2 s) for kvmid to end it, so that the verdicts
// already sent are used rather than cut off by a cancelled stream. Events that arrive meanwhile are
// left to kvmid, which answers them with the claim's fallback.
func detach(stream kvmiv1.Introspection_AttachClient, cancel context.CancelFunc) error {
	if err := stream.CloseSend(); err != nil {
		return err
	}
	timer := time.AfterFunc(2*time.Second, cancel)
	defer timer.Stop()
	for {
		if _, err := stream.Recv(); err != nil {
			return nil
		}
	}
}

// streamError: a failed Send reports io.EOF; the real status comes from Recv.
func streamError(stream kvmiv1.Introspection_AttachClient, err error) error {
	if err == io.EOF {
		if _, rerr := stream.Recv(); rerr != nil {
			return rerr
		}
	}
	return err
}

func formatEvent(ev *kvmiv1.Event) string {
	var b strings.Builder
	fmt.Fprintf(&b, "event id=%d vm=%s vcpu=%d type=%s rip=%#x", ev.GetId(), ev.GetVmName(),
		ev.GetVcpu(), ev.GetType(), ev.GetRip())
	switch d := ev.GetDetail().(type) {
	case *kvmiv1.Event_Cr:
		fmt.Fprintf(&b, " cr%d %#x->%#x", d.Cr.GetCr(), d.Cr.GetOldValue(), d.Cr.GetNewValue())
	case *kvmiv1.Event_Msr:
		fmt.Fprintf(&b, " msr=%#x %#x->%#x", d.Msr.GetMsr(), d.Msr.GetOldValue(), d.Msr.GetNewValue())
	case *kvmiv1.Event_Pf:
		fmt.Fprintf(&b, " pf gpa=%#x gva=%#x access=%s", d.Pf.GetGpa(), d.Pf.GetGva(), d.Pf.GetAccess())
	case *kvmiv1.Event_Breakpoint:
		fmt.Fprintf(&b, " breakpoint gpa=%#x", d.Breakpoint.GetGpa())
	case *kvmiv1.Event_Trap:
		fmt.Fprintf(&b, " trap vector=%d", d.Trap.GetVector())
	case *kvmiv1.Event_DescriptorTable:
		fmt.Fprintf(&b, " descriptor table=%d write=%v", d.DescriptorTable.GetTable(), d.DescriptorTable.GetWrite())
	}
	if ev.GetAction() != kvmiv1.Action_ACTION_UNSPECIFIED {
		fmt.Fprintf(&b, " => %s", ev.GetAction())
		if ev.GetKeptOldValue() {
			b.WriteString(" (old value kept)")
		}
		if ev.GetDecidedBy() != "" {
			fmt.Fprintf(&b, " by %s", ev.GetDecidedBy())
		}
	}
	if len(ev.GetMonitorHits()) > 0 {
		fmt.Fprintf(&b, " monitor=%s", strings.Join(ev.GetMonitorHits(), ","))
	}
	if r := ev.GetRegisters(); r != nil {
		fmt.Fprintf(&b, " regs{rax=%#x rsp=%#x cr3=%#x}", r.GetRax(), r.GetRsp(), r.GetCr3())
	}
	return b.String()
}

func splitList(s string) []string {
	var out []string
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

func parseUints(s string) ([]uint32, error) {
	var out []uint32
	for _, part := range splitList(s) {
		v, err := strconv.ParseUint(part, 0, 32)
		if err != nil {
			return nil, err
		}
		out = append(out, uint32(v))
	}
	return out, nil
}

// parseEventTypes accepts EVENT_TYPE_MSR, MSR or msr.
func parseEventTypes(s string) ([]kvmiv1.EventType, error) {
	var out []kvmiv1.EventType
	for _, part := range splitList(s) {
		name := strings.ToUpper(part)
		if !strings.HasPrefix(name, "EVENT_TYPE_") {
			name = "EVENT_TYPE_" + name
		}
		v, ok := kvmiv1.EventType_value[name]
		if !ok || v == 0 {
			return nil, fmt.Errorf("--events: unknown event type %q", part)
		}
		out = append(out, kvmiv1.EventType(v))
	}
	return out, nil
}
