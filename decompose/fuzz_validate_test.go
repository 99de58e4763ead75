package decompose_test

import (
	"errors"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// fuzzMaxNewElements bounds the weight elements of the new layers that one
// fuzzed file may request. ParseInfo accepts ranks up to 2^20, so a valid
// 400-byte file can make NetworkInfo allocate gigabytes. Such inputs test
// the allocator rather than the validation, so they are skipped.
const fuzzMaxNewElements = 1 << 22

// fuzzSentinels are the errors that a NetworkInfo failure must wrap.
var fuzzSentinels = []error{
	decompose.ErrInvalidInfo, decompose.ErrUnknownMode, decompose.ErrInconsistentShapes,
	decompose.ErrUnsupportedGroups, decompose.ErrDuplicateLayer, decompose.ErrLayerNotFound,
	decompose.ErrNotConv2d, decompose.ErrAttributeMismatch, decompose.ErrUnsupportedLayer,
}

// fuzzModelState is what a failed NetworkInfo must leave unchanged.
type fuzzModelState struct {
	Modules []torch.ModuleInfo
	State   []torch.StateEntry
}

func fuzzSnapshot(t testing.TB, m *torch.Module) fuzzModelState {
	t.Helper()
	modules, err := m.NamedModules()
	require.NoError(t, err)
	state, err := m.StateDict()
	require.NoError(t, err)
	return fuzzModelState{Modules: modules, State: state}
}

// fuzzNewElements returns the number of weight elements of the new layers
// that info lists.
func fuzzNewElements(info *decompose.Info) int64 {
	var total int64
	for _, e := range info.Entries {
		for _, shape := range [][4]int{e.FirstShape, e.LastShape} {
			n := int64(1)
			for _, s := range shape {
				n *= int64(s)
			}
			total += n
		}
	}
	return total
}

// FuzzNetworkInfo runs NetworkInfo on the mixed fixture with every fuzzed
// information file that ParseInfo accepts. NetworkInfo must not panic. When
// it fails, the error must wrap a sentinel and name the file, and the
// model's modules and state dict must be as they were. When it succeeds,
// every listed layer must have become a Sequential of two Conv2d layers,
// and the model is loaded again for the next input.
func FuzzNetworkInfo(f *testing.F) {
	path := testutil.Fixture(f, "mixed")
	work, err := torch.Load(path)
	require.NoError(f, err)
	f.Cleanup(func() { work.Close() })
	pristine := fuzzSnapshot(f, work)

	// The committed corpus in testdata/fuzz/FuzzNetworkInfo holds edited
	// variants of mixed's file; the unedited file is the seed added here.
	data, err := os.ReadFile(testutil.AMCT("mixed", "decompose_info.json"))
	require.NoError(f, err)
	f.Add(data)

	f.Fuzz(func(t *testing.T, data []byte) {
		info, err := decompose.ParseInfo(data, "fuzz.json")
		if err != nil || fuzzNewElements(info) > fuzzMaxNewElements {
			return
		}

		result, changes, err := decompose.NetworkInfo(work, info, "fuzz.json")
		if err != nil {
			assert.Nil(t, result)
			assert.Nil(t, changes)
			assert.Contains(t, err.Error(), "fuzz.json", "the error must name the file")
			assert.NotContains(t, err.Error(), "Exception raised from")
			assert.True(t, wrapsAny(err, fuzzSentinels), "error wraps no sentinel: %v", err)
			require.Equal(t, pristine, fuzzSnapshot(t, work), "the model changed although NetworkInfo failed with: %v", err)
			return
		}

		require.Len(t, changes, len(info.Entries))
		modules, err := result.NamedModules()
		require.NoError(t, err)
		byName := make(map[string]torch.ModuleInfo, len(modules))
		for _, m := range modules {
			byName[m.Name] = m
		}
		for i, c := range changes {
			assert.Equal(t, info.Entries[i].Layer.Name, c.Layer)
			if c.Layer != "" {
				assert.Equal(t, "Sequential", byName[c.Layer].Class, "layer %s", c.Layer)
			}
			for _, name := range c.NewLayers {
				assert.True(t, byName[name].Conv2d, "new layer %s must be a Conv2d", name)
			}
		}

		if !result.SameObject(work) {
			result.Close()
		}
		work.Close()
		work, err = torch.Load(path)
		require.NoError(t, err)
	})
}

func wrapsAny(err error, targets []error) bool {
	for _, target := range targets {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}
