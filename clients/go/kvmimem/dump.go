// Package kvmimem reads and writes guest memory in bulk through kvmid's streaming RPCs
// (ReadPhysicalStream, WritePhysicalStream), with stock gRPC client settings: kvmid's chunks stay
// far under gRPC's default 4 MiB receive limit.
package kvmimem

import (
	"context"
	"fmt"
	"io"
	"time"

	kvmiv1 "github.com/kvmid/kvmid/clients/go/kvmi/v1"
)

// ChunkBytes is the chunk size Dump asks for and Write sends: 256 KiB (kvmid's default; faster
// than its largest, 1 MiB, in tests/bench/memory_bench).
const ChunkBytes = 256 << 10

// Stats is what Dump did.
type Stats struct {
	Bytes     uint64 // guest memory covered
	Chunks    uint64 // ReadPhysicalStreamResponse messages received
	ZeroPages uint64 // 4 KiB pages kvmid did not send because they were all zero
	Elapsed   time.Duration
}

// MiBPerSecond is the dump's rate.
func (s Stats) MiBPerSecond() float64 {
	if s.Elapsed <= 0 {
		return 0
	}
	return float64(s.Bytes) / (1 << 20) / s.Elapsed.Seconds()
}

// Dump writes `size` bytes of guest physical memory from `gpa` into w (offset 0 = gpa). Zero
// pages are not sent by kvmid and not written (w gets holes: a fresh file becomes sparse).
// progress, if not nil, is called after each chunk with the bytes done so far.
func Dump(ctx context.Context, client kvmiv1.IntrospectionClient, vm string, gpa, size uint64,
	w io.WriterAt, progress func(done uint64)) (Stats, error) {
	start := time.Now()
	var stats Stats
	stream, err := client.ReadPhysicalStream(ctx, &kvmiv1.ReadPhysicalStreamRequest{
		Vm: vm, Gpa: gpa, Size: size, ChunkBytes: ChunkBytes, SkipZeroPages: true,
	})
	if err != nil {
		return stats, err
	}
	for {
		chunk, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return stats, err
		}
		if chunk.GetGpa() != gpa+stats.Bytes {
			return stats, fmt.Errorf("kvmimem: chunk at gpa %#x, expected %#x", chunk.GetGpa(),
				gpa+stats.Bytes)
		}
		switch {
		case chunk.GetZero():
			stats.ZeroPages += (chunk.GetSize() + 4095) / 4096
		case chunk.GetError() != "":
			return stats, fmt.Errorf("kvmimem: %s", chunk.GetError())
		default:
			if _, err := w.WriteAt(chunk.GetData(), int64(stats.Bytes)); err != nil {
				return stats, err
			}
		}
		stats.Bytes += chunk.GetSize()
		stats.Chunks++
		if progress != nil {
			progress(stats.Bytes)
		}
	}
	stats.Elapsed = time.Since(start)
	if stats.Bytes != size {
		return stats, fmt.Errorf("kvmimem: the stream covered %d of %d bytes", stats.Bytes, size)
	}
	return stats, nil
}

// Write writes data into guest physical memory at gpa with one WritePhysicalStream, in messages
// of at most ChunkBytes. It returns the bytes kvmid wrote.
func Write(ctx context.Context, client kvmiv1.IntrospectionClient, vm string, gpa uint64,
	data []byte) (uint64, error) {
	stream, err := client.WritePhysicalStream(ctx)
	if err != nil {
		return 0, err
	}
	for off := 0; off == 0 || off < len(data); off += ChunkBytes {
		end := off + ChunkBytes
		if end > len(data) {
			end = len(data)
		}
		msg := &kvmiv1.WritePhysicalStreamRequest{Data: data[off:end]}
		if off == 0 {
			msg.Vm, msg.Gpa, msg.Size = vm, gpa, uint64(len(data))
		}
		if err := stream.Send(msg); err != nil {
			break // the status comes with CloseAndRecv
		}
	}
	response, err := stream.CloseAndRecv()
	if err != nil {
		return 0, err
	}
	return response.GetBytesWritten(), nil
}
