package decompose_test

import (
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// concurrentWorkers is the number of goroutines that decompose at once.
const concurrentWorkers = 8

// concurrentRounds repeats the concurrent runs, because libtorch's own data
// races (which the Go race detector does not see) show up only sometimes.
const concurrentRounds = 3

// concurrentStructure describes a model by what Network must make of it:
// each module's name, class and whether it is a Conv2d, and each state-dict
// entry's name, shape and dtype. Type names are left out, because every
// copy's class types have names of their own.
func concurrentStructure(t *testing.T, m *torch.Module) []string {
	t.Helper()
	modules, err := m.NamedModules()
	require.NoError(t, err)
	state, err := m.StateDict()
	require.NoError(t, err)
	lines := make([]string, 0, len(modules)+len(state))
	for _, mod := range modules {
		lines = append(lines, fmt.Sprintf("module %q %s conv2d=%v", mod.Name, mod.Class, mod.Conv2d))
	}
	for _, entry := range state {
		lines = append(lines, fmt.Sprintf("state %s %v %s parameter=%v", entry.Name, entry.Shape, entry.DType, entry.Parameter))
	}
	return lines
}

// concurrentOutcome is what one goroutine reports.
type concurrentOutcome struct {
	structure []string
	changes   decompose.Changes
	shape     []int64
	err       error
}

// decomposeAll runs Network on every model at once, one goroutine each,
// starting them together, then runs each result's forward on a (1, 3, 32, 32)
// input in the same goroutine.
func decomposeAll(t *testing.T, models []*torch.Module, infoPath string) []concurrentOutcome {
	t.Helper()
	outcomes := make([]concurrentOutcome, len(models))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, m := range models {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			outcomes[i] = decomposeOne(m, infoPath)
		}()
	}
	close(start)
	wg.Wait()

	for i := range outcomes {
		require.NoError(t, outcomes[i].err, "goroutine %d", i)
		outcomes[i].structure = concurrentStructure(t, models[i])
	}
	return outcomes
}

func decomposeOne(m *torch.Module, infoPath string) concurrentOutcome {
	result, changes, err := decompose.Network(m, infoPath)
	if err != nil {
		return concurrentOutcome{err: err}
	}
	if !result.SameObject(m) {
		result.Close()
		return concurrentOutcome{err: fmt.Errorf("Network returned a new module for a model that is no Conv2d")}
	}
	x, err := torch.FromFloat32(make([]float32, 3*32*32), 1, 3, 32, 32)
	if err != nil {
		return concurrentOutcome{err: err}
	}
	defer x.Close()
	outs, err := m.Forward(x)
	if err != nil {
		return concurrentOutcome{err: fmt.Errorf("forward after Network: %w", err)}
	}
	defer func() {
		for _, out := range outs {
			out.Close()
		}
	}()
	if len(outs) != 1 {
		return concurrentOutcome{err: fmt.Errorf("forward returned %d tensors, want 1", len(outs))}
	}
	return concurrentOutcome{changes: changes, shape: outs[0].Shape()}
}

// concurrentReference decomposes one copy of mixed alone and returns what
// every concurrent run must match.
func concurrentReference(t *testing.T, original *torch.Module, infoPath string) concurrentOutcome {
	t.Helper()
	m, err := original.Clone()
	require.NoError(t, err)
	defer m.Close()
	want := decomposeOne(m, infoPath)
	require.NoError(t, want.err)
	want.structure = concurrentStructure(t, m)
	require.Len(t, want.changes, 6, "mixed's file lists six layers")
	return want
}

func assertOutcomes(t *testing.T, want concurrentOutcome, got []concurrentOutcome) {
	t.Helper()
	for i, outcome := range got {
		assert.Equal(t, want.changes, outcome.changes, "goroutine %d: changes", i)
		assert.Equal(t, want.structure, outcome.structure, "goroutine %d: modules and state dict", i)
		assert.Equal(t, want.shape, outcome.shape, "goroutine %d: output shape", i)
	}
}

// TestConcurrentNetworkClones decomposes copies of one model, made with
// Clone, from several goroutines at once. The README promises that distinct
// models, copies included, may be used concurrently.
func TestConcurrentNetworkClones(t *testing.T) {
	original, err := torch.Load(testutil.Fixture(t, "mixed"))
	require.NoError(t, err)
	defer original.Close()
	infoPath := testutil.AMCT("mixed", "decompose_info.json")
	originalBefore := concurrentStructure(t, original)
	want := concurrentReference(t, original, infoPath)

	for round := 0; round < concurrentRounds; round++ {
		models := make([]*torch.Module, concurrentWorkers)
		for i := range models {
			models[i], err = original.Clone()
			require.NoError(t, err)
		}
		assertOutcomes(t, want, decomposeAll(t, models, infoPath))
		for _, m := range models {
			m.Close()
		}
	}
	assert.Equal(t, originalBefore, concurrentStructure(t, original), "decomposing the copies changed the original")
}

// TestConcurrentNetworkLoads decomposes models loaded separately from the
// same file, from several goroutines at once.
func TestConcurrentNetworkLoads(t *testing.T) {
	path := testutil.Fixture(t, "mixed")
	infoPath := testutil.AMCT("mixed", "decompose_info.json")
	original, err := torch.Load(path)
	require.NoError(t, err)
	want := concurrentReference(t, original, infoPath)
	original.Close()

	models := make([]*torch.Module, concurrentWorkers)
	for i := range models {
		models[i], err = torch.Load(path)
		require.NoError(t, err)
		defer models[i].Close()
	}
	assertOutcomes(t, want, decomposeAll(t, models, infoPath))
}

// TestConcurrentNetworkErrors runs failing and succeeding Network calls on
// copies at once: every failure must leave its copy as it was.
func TestConcurrentNetworkErrors(t *testing.T) {
	original, err := torch.Load(testutil.Fixture(t, "mixed"))
	require.NoError(t, err)
	defer original.Close()
	good := testutil.AMCT("mixed", "decompose_info.json")
	// The last entry of this file does not match its layer, so Network fails
	// after planning the other five.
	info, err := decompose.ReadInfo(good)
	require.NoError(t, err)
	info.Entries[5].Layer.Stride = [2]int{2, 2}
	bad := writeConcurrentInfo(t, info)

	models := make([]*torch.Module, concurrentWorkers)
	before := make([][]string, concurrentWorkers)
	for i := range models {
		models[i], err = original.Clone()
		require.NoError(t, err)
		defer models[i].Close()
		before[i] = concurrentStructure(t, models[i])
	}

	errs := make([]error, concurrentWorkers)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, m := range models {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			path := good
			if i%2 == 1 {
				path = bad
			}
			result, _, err := decompose.Network(m, path)
			if err == nil && !result.SameObject(m) {
				result.Close()
			}
			errs[i] = err
		}()
	}
	close(start)
	wg.Wait()

	for i, m := range models {
		if i%2 == 0 {
			assert.NoError(t, errs[i], "goroutine %d", i)
			continue
		}
		assert.ErrorIs(t, errs[i], decompose.ErrAttributeMismatch, "goroutine %d", i)
		assert.Equal(t, before[i], concurrentStructure(t, m), "goroutine %d: a failed Network changed the model", i)
	}
}

func writeConcurrentInfo(t *testing.T, info *decompose.Info) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "decompose_info.json")
	require.NoError(t, info.WriteFile(path))
	return path
}

// TestConcurrentFailureKeepsOthersDraws runs Network calls that fail after
// their draws (a parent reads the layer's weight, so Replace rejects it)
// next to successful calls. The failed calls put the generator back, which
// must not rewind the successful calls into drawing the same values twice.
func TestConcurrentFailureKeepsOthersDraws(t *testing.T) {
	dir, manifest := shapeSet(t)
	failing := shapeCaseOf(t, manifest, "reads_weight")
	badModel, err := torch.Load(filepath.Join(dir, failing.Model))
	require.NoError(t, err)
	defer badModel.Close()
	badInfo := filepath.Join(dir, failing.Info)

	good, err := torch.Load(testutil.Fixture(t, "mixed"))
	require.NoError(t, err)
	defer good.Close()
	goodInfo := testutil.AMCT("mixed", "decompose_info.json")
	info, err := decompose.ReadInfo(goodInfo)
	require.NoError(t, err)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	failures := 0
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, _, err := decompose.Network(badModel, badInfo); err != nil {
				failures++
			}
		}
	}()

	for round := 0; round < 8; round++ {
		clone, err := good.Clone()
		require.NoError(t, err)
		result, _, err := decompose.Network(clone, goodInfo)
		require.NoError(t, err)

		// Any four consecutive float32 values seen twice mean a rewind.
		seen := map[[4]float32]string{}
		for _, e := range info.Entries {
			for _, layer := range []string{"0", "1"} {
				name := e.Layer.Name + "." + layer + ".weight"
				values := float32s(t, parameter(t, result, name))
				for k := 0; k+4 <= len(values); k++ {
					window := [4]float32(values[k : k+4])
					if earlier, ok := seen[window]; ok {
						t.Fatalf("round %d: %s[%d:%d] repeats %s", round, name, k, k+4, earlier)
					}
					seen[window] = fmt.Sprintf("%s[%d]", name, k)
				}
			}
		}
		result.Close()
		clone.Close()
	}
	close(stop)
	wg.Wait()
	assert.Positive(t, failures, "no failing call ran alongside")
}
