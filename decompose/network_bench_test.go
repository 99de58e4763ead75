package decompose_test

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// benchFixture returns the TorchScript file of a zoo model. vgg16's file is
// over 500 MB, so its benchmarks run only when the fixture exists or
// CONVSPLIT_LARGE=1 requests it.
func benchFixture(b *testing.B, name string) string {
	b.Helper()
	if name == "vgg16" && os.Getenv("CONVSPLIT_LARGE") != "1" {
		path := filepath.Join(testutil.FixtureDir(), name+".pt")
		if _, err := os.Stat(path); err != nil {
			b.Skipf("%s is missing; set CONVSPLIT_LARGE=1 to make it (over 500 MB)", path)
		}
	}
	return testutil.Fixture(b, name)
}

func loadBenchModel(b *testing.B, path string) *torch.Module {
	b.Helper()
	model, err := torch.Load(path)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(model.Close)
	return model
}

// cpuTime returns the CPU time (user and system) the process has used so
// far, all threads included.
func cpuTime(b *testing.B) time.Duration {
	usage := rusage(b)
	return time.Duration(usage.Utime.Nano() + usage.Stime.Nano())
}

// pageFaults returns the number of minor page faults the process has taken
// so far: each is a fresh page of memory touched for the first time.
func pageFaults(b *testing.B) int64 {
	return rusage(b).Minflt
}

func rusage(b *testing.B) syscall.Rusage {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		b.Fatal(err)
	}
	return usage
}

// benchmarkNetwork times decompose.Network on a fresh Clone of model per
// iteration; cloning and releasing are not timed. Besides the wall-clock
// time it reports the time per replaced layer, the fastest and the median
// call (min-ns/op, median-ns/op) and the process's CPU time per call
// (cpu-ns/op). The last three are less disturbed by other processes on a
// busy machine. Network draws on a second thread, so its CPU time can
// exceed its wall-clock time.
//
// Clone saves and loads the model in memory, 0.3 to 0.4 s for resnet50 and
// about 1.8 s for vgg16 on a 2-CPU AMD EPYC, so a fixed count such as
// -benchtime=30x keeps the run short.
func benchmarkNetwork(b *testing.B, model *torch.Module, infoPath string, layers int) {
	b.ReportAllocs()
	timeOnClones(b, model, func(clone *torch.Module) func() {
		result, _, err := decompose.Network(clone, infoPath)
		if err != nil {
			b.Fatal(err)
		}
		return result.Close
	})
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/float64(layers), "us/layer")
}

// timeOnClones times body on a fresh Clone of model per iteration (see
// timeOnce). It reports the CPU time (cpu-ns/op), the page faults
// (faults/op) and the spread of the timed calls.
func timeOnClones(b *testing.B, model *torch.Module, body func(clone *torch.Module) (release func())) {
	var cpu time.Duration
	var faults int64
	times := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		call := timeOnce(b, model, body)
		times = append(times, call.elapsed)
		cpu += call.cpu
		faults += call.faults
	}
	b.StopTimer()
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
	b.ReportMetric(float64(faults)/float64(b.N), "faults/op")
	reportSpread(b, times)
}

// timedCall is one call measured by timeOnce.
type timedCall struct {
	elapsed, cpu time.Duration
	faults       int64
}

// timeOnce times one call of body on a fresh clone of model, with the
// process's CPU time and page faults during it. Cloning, the release
// function body returns and closing the clone stay outside the benchmark's
// timer.
func timeOnce(b *testing.B, model *torch.Module, body func(clone *torch.Module) (release func())) timedCall {
	b.StopTimer()
	clone, err := model.Clone()
	if err != nil {
		b.Fatal(err)
	}
	startFaults, startCPU := pageFaults(b), cpuTime(b)
	b.StartTimer()
	// StartTimer and StopTimer read the memory statistics, which stops the
	// world, so the call's own clock starts and stops inside them.
	start := time.Now()
	release := body(clone)
	elapsed := time.Since(start)
	b.StopTimer()
	call := timedCall{elapsed: elapsed, cpu: cpuTime(b) - startCPU, faults: pageFaults(b) - startFaults}
	release()
	clone.Close()
	b.StartTimer()
	return call
}

// reportSpread reports the fastest and the median of the timed calls
// (min-ns/op, median-ns/op), which other processes on the machine disturb
// less than the mean.
func reportSpread(b *testing.B, times []time.Duration) {
	b.ReportMetric(float64(slices.Min(times).Nanoseconds()), "min-ns/op")
	b.ReportMetric(float64(median(times).Nanoseconds()), "median-ns/op")
}

// median returns the middle value of times, the upper one of the two
// middle values for an even count, and leaves times unsorted.
func median(times []time.Duration) time.Duration {
	sorted := slices.Clone(times)
	slices.Sort(sorted)
	return sorted[len(sorted)/2]
}

func benchEntryCount(b *testing.B, infoPath string) int {
	b.Helper()
	info, err := decompose.ReadInfo(infoPath)
	if err != nil {
		b.Fatal(err)
	}
	return len(info.Entries)
}

// BenchmarkNetwork compares with AMCT's decompose_network, whose times on
// this kind of machine are in testdata/amct/*/reference.json
// (amct_seconds.decompose_network).
func BenchmarkNetwork(b *testing.B) {
	onZooModels(b, func(b *testing.B, model *torch.Module, infoPath string) {
		benchmarkNetwork(b, model, infoPath, benchEntryCount(b, infoPath))
	})
}

// onZooModels runs bench as one sub-benchmark per large zoo model, on the
// loaded model and AMCT's information file for it.
func onZooModels(b *testing.B, bench func(b *testing.B, model *torch.Module, infoPath string)) {
	for _, name := range []string{"resnet50", "vgg16"} {
		b.Run(name, func(b *testing.B) {
			bench(b, loadBenchModel(b, benchFixture(b, name)), testutil.AMCT(name, "decompose_info.json"))
		})
	}
}

// BenchmarkNetworkLayers restructures resnet50 with the first 1, 10 and all
// entries of its information file, to show how the time grows with the
// number of layers. Each count is measured in pairs, as in
// BenchmarkNetworkBeyondDraws.
func BenchmarkNetworkLayers(b *testing.B) {
	model := loadBenchModel(b, benchFixture(b, "resnet50"))
	info, err := decompose.ReadInfo(testutil.AMCT("resnet50", "decompose_info.json"))
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	for _, n := range []int{1, 10, len(info.Entries)} {
		truncated := &decompose.Info{Entries: info.Entries[:n]}
		path := filepath.Join(dir, "first"+strconv.Itoa(n)+".json")
		if err := truncated.WriteFile(path); err != nil {
			b.Fatal(err)
		}
		b.Run(strconv.Itoa(n), func(b *testing.B) {
			benchmarkBeyondDraws(b, model, path)
		})
	}
}

// BenchmarkNetworkDraws times the weight draws of Network alone (see
// benchmarkDraws), the floor under Network's time.
func BenchmarkNetworkDraws(b *testing.B) {
	onZooModels(b, benchmarkDraws)
}

// benchmarkDraws times the draws alone: the new tensors Network allocates
// and draws for the information file, drawn one after the other on the
// calling goroutine. Each iteration first clones the model and keeps the
// tensors until its timer stops, as benchmarkNetwork does, so the draws meet
// the allocator in the same state as Network's and write to memory as
// fresh. It reports the fastest and the median iteration (min-ns/op,
// median-ns/op), the CPU time per iteration (cpu-ns/op) and the number of
// weights drawn (weights/op).
func benchmarkDraws(b *testing.B, model *torch.Module, infoPath string) {
	specs := benchLayerSpecs(b, model, infoPath)
	timeOnClones(b, model, func(*torch.Module) func() { return drawAll(b, specs) })

	var weights int
	for _, spec := range specs {
		weights += spec.OutChannels * spec.InChannels / spec.Groups * spec.KernelSize[0] * spec.KernelSize[1]
		if spec.Bias {
			weights += spec.OutChannels
		}
	}
	b.ReportMetric(float64(weights), "weights/op")
}

// BenchmarkNetworkBeyondDraws measures what Network costs beyond its weight
// draws (see benchmarkBeyondDraws).
func BenchmarkNetworkBeyondDraws(b *testing.B) {
	onZooModels(b, benchmarkBeyondDraws)
}

// benchmarkBeyondDraws measures Network's cost beyond its weight draws as
// paired differences. Each iteration times Network on one fresh clone and
// the draws alone (as benchmarkDraws does them) on another, in an order that
// alternates between iterations, so both calls of a pair meet the same
// machine state. It reports the median of the per-pair differences
// (beyond-ns/op) and the medians of both calls. The medians of separate
// BenchmarkNetwork and BenchmarkNetworkDraws runs, minutes apart, can differ
// by as much as the quantity measured here.
func benchmarkBeyondDraws(b *testing.B, model *torch.Module, infoPath string) {
	specs := benchLayerSpecs(b, model, infoPath)
	network := func(clone *torch.Module) func() {
		result, _, err := decompose.Network(clone, infoPath)
		if err != nil {
			b.Fatal(err)
		}
		return result.Close
	}
	draws := func(*torch.Module) func() { return drawAll(b, specs) }

	var networkTimes, drawTimes, beyond []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var networkCall, drawCall timedCall
		if i%2 == 0 {
			networkCall, drawCall = timeOnce(b, model, network), timeOnce(b, model, draws)
		} else {
			drawCall, networkCall = timeOnce(b, model, draws), timeOnce(b, model, network)
		}
		networkTime, drawTime := networkCall.elapsed, drawCall.elapsed
		networkTimes = append(networkTimes, networkTime)
		drawTimes = append(drawTimes, drawTime)
		beyond = append(beyond, networkTime-drawTime)
	}
	b.StopTimer()
	b.ReportMetric(float64(median(beyond).Nanoseconds()), "beyond-ns/op")
	b.ReportMetric(float64(median(networkTimes).Nanoseconds()), "network-ns/op")
	b.ReportMetric(float64(median(drawTimes).Nanoseconds()), "draws-ns/op")
}

// drawAll allocates and draws the tensors of specs one after the other on
// the calling goroutine, and returns the function that releases them.
func drawAll(b *testing.B, specs []torch.Conv2dSpec) (release func()) {
	tensors := make([]*torch.Tensor, 0, 2*len(specs))
	for _, spec := range specs {
		weight, bias, err := torch.NewConv2dParameters(spec)
		if err != nil {
			b.Fatal(err)
		}
		tensors = append(tensors, weight, bias)
		if err := torch.DrawConv2dParameters(weight, bias); err != nil {
			b.Fatal(err)
		}
	}
	return func() {
		for _, t := range tensors {
			t.Close()
		}
	}
}

// benchLayerSpecs returns the specs of the layers Network makes for the
// information file, in its order: per entry the first, then the last layer.
func benchLayerSpecs(b *testing.B, model *torch.Module, infoPath string) []torch.Conv2dSpec {
	b.Helper()
	info, err := decompose.ReadInfo(infoPath)
	if err != nil {
		b.Fatal(err)
	}
	var specs []torch.Conv2dSpec
	for _, e := range info.Entries {
		sub, err := model.Submodule(e.Layer.Name)
		if err != nil {
			b.Fatal(err)
		}
		g, err := sub.Conv2d()
		sub.Close()
		if err != nil {
			b.Fatal(err)
		}
		dtype, err := torch.ParseDType(g.DType)
		if err != nil {
			b.Fatal(err)
		}
		first, last, err := e.SplitGeometry(decompose.ConvGeometry{
			InChannels: g.InChannels, OutChannels: g.OutChannels, KernelSize: g.KernelSize, Stride: g.Stride,
			Padding: g.Padding, Dilation: g.Dilation, Groups: g.Groups, PaddingMode: g.PaddingMode, Bias: g.Bias,
		})
		if err != nil {
			b.Fatal(err)
		}
		for _, n := range []decompose.ConvGeometry{first, last} {
			specs = append(specs, torch.Conv2dSpec{
				InChannels: n.InChannels, OutChannels: n.OutChannels, Groups: n.Groups,
				KernelSize: n.KernelSize, Stride: n.Stride, Padding: n.Padding, Dilation: n.Dilation,
				PaddingMode: n.PaddingMode, Bias: n.Bias, DType: dtype,
				ChannelsLast: g.ChannelsLast, Training: g.Training,
			})
		}
	}
	return specs
}

// BenchmarkRewrite times what convsplit apply does: load the file,
// restructure the model and save it.
func BenchmarkRewrite(b *testing.B) {
	for _, name := range []string{"resnet50", "vgg16"} {
		b.Run(name, func(b *testing.B) {
			path := benchFixture(b, name)
			infoPath := testutil.AMCT(name, "decompose_info.json")
			out := filepath.Join(b.TempDir(), "out.pt")
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				model, err := torch.Load(path)
				if err != nil {
					b.Fatal(err)
				}
				result, _, err := decompose.Network(model, infoPath)
				if err != nil {
					b.Fatal(err)
				}
				if err := result.Save(out); err != nil {
					b.Fatal(err)
				}
				result.Close()
				model.Close()
			}
		})
	}
}
