package main

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// callFn makes call number n (it picks the request) and returns its error, if any.
type callFn func(n int) error

// result is one target's part of the report.
type result struct {
	// StartedS: when each successful call began, in seconds since the process started.
	StartedS []float64 `json:"started_s"`
	// ElapsedS: each successful call's latency in seconds.
	ElapsedS []float64 `json:"elapsed_s"`
	// Errors counts the failed calls by status, "CODE: message".
	Errors map[string]int `json:"errors"`
	// WallS sums the recorded blocks' wall time, for throughput.
	WallS float64 `json:"wall_s"`
}

// guarded runs one RPC without a deadline, as the kubelet's Allocate does: a deadline would send a grpc-timeout
// header that the plugin then has to enforce, which the kubelet never asks for. A local timer only cancels a call
// stalled past limit, so a hung plugin cannot hang the run; 0 means no limit at all.
func guarded(limit time.Duration, rpc func(ctx context.Context) error) error {
	if limit == 0 {
		return rpc(context.Background())
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stall := time.AfterFunc(limit, cancel)
	err := rpc(ctx)
	if !stall.Stop() && err != nil {
		return status.Errorf(codes.DeadlineExceeded, "no answer within %s (client-side limit, never sent)", limit)
	}
	return err
}

// codeNames are the canonical status names (Python's grpclib and grpcio print these, Go's codes print CamelCase).
var codeNames = [...]string{
	"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
	"PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
	"INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
}

// describe turns an error into "CODE: message", at most 200 characters; errors that are not gRPC statuses (a
// checkpoint write) come out as UNKNOWN.
func describe(err error) string {
	s := status.Convert(err)
	name := s.Code().String()
	if int(s.Code()) < len(codeNames) {
		name = codeNames[s.Code()]
	}
	text := name + ": " + s.Message()
	if utf8.RuneCountInString(text) > 200 {
		text = string([]rune(text)[:200])
	}
	return text
}

// runBlock makes calls first .. first+count-1 with `callers` closed-loop goroutines (each waits for its answer
// before taking the next number), recording into rec; rec nil is the warm-up.
func runBlock(call callFn, first, count, callers int, rec *result) {
	next := int64(first)
	end := int64(first + count)
	// Each caller keeps its own samples, merged after the block: no lock on the measured path.
	parts := make([]result, minInt(callers, count))
	began := time.Now()
	var wg sync.WaitGroup
	for i := range parts {
		wg.Add(1)
		go func(part *result) {
			defer wg.Done()
			for n := atomic.AddInt64(&next, 1) - 1; n < end; n = atomic.AddInt64(&next, 1) - 1 {
				start := time.Now()
				err := call(int(n))
				elapsed := time.Since(start)
				switch {
				case rec == nil:
				case err != nil:
					if part.Errors == nil {
						part.Errors = map[string]int{}
					}
					part.Errors[describe(err)]++
				default:
					part.StartedS = append(part.StartedS, start.Sub(processStart).Seconds())
					part.ElapsedS = append(part.ElapsedS, elapsed.Seconds())
				}
			}
		}(&parts[i])
	}
	wg.Wait()
	if rec == nil {
		return
	}
	rec.WallS += time.Since(began).Seconds()
	for _, part := range parts {
		rec.StartedS = append(rec.StartedS, part.StartedS...)
		rec.ElapsedS = append(rec.ElapsedS, part.ElapsedS...)
		for message, count := range part.Errors {
			rec.Errors[message] += count
		}
	}
}

// interleave mirrors benchmarks/callers.py: `warmup` unrecorded calls per target, then rounds of a block of calls
// on each target in turn, the order rotating by one each round, until `calls` calls per target are recorded. Noise
// and drift on the machine then fall on every target alike, which keeps their ratios fair. Recorded calls are
// numbered 0 .. calls-1 per target (warm-up calls 0 .. warmup-1), so every target gets the same requests.
func interleave(names []string, calls map[string]callFn, total, callers, block, warmup int) map[string]*result {
	results := make(map[string]*result, len(names))
	for _, name := range names {
		results[name] = &result{StartedS: []float64{}, ElapsedS: []float64{}, Errors: map[string]int{}}
		if warmup > 0 {
			runBlock(calls[name], 0, warmup, callers, nil)
		}
	}
	for round, done := 0, 0; done < total; round++ {
		size := minInt(block, total-done)
		for i := range names {
			name := names[(round+i)%len(names)]
			runBlock(calls[name], done, size, callers, results[name])
		}
		done += size
	}
	return results
}

func minInt(a, b int) int {
	if a < b {
		return a
	}
	return b
}
