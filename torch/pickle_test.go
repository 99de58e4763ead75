package torch

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestUnpickleValues(t *testing.T) {
	cases := []struct {
		name string
		data string
		want any
	}{
		{"none", "\x80\x02N.", nil},
		{"true", "\x80\x02\x88.", true},
		{"binint1", "\x80\x02K\xff.", int64(255)},
		{"binint2", "\x80\x02M\x00\x01.", int64(256)},
		{"negative binint", "\x80\x02J\xff\xff\xff\xff.", int64(-1)},
		{"long1 negative", "\x80\x02\x8a\x02\x00\xff.", int64(-256)},
		{"long1 zero", "\x80\x02\x8a\x00.", int64(0)},
		{"long1 eight bytes", "\x80\x02\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x40.", int64(1) << 62},
		{"binfloat", "\x80\x02G?\xf8\x00\x00\x00\x00\x00\x00.", 1.5},
		{"short unicode", "\x80\x04\x8c\x02hi\x94.", "hi"},
		{"tuple2", "\x80\x02K\x01K\x02\x86.", pickleTuple{int64(1), int64(2)}},
		{"memo", "\x80\x02X\x01\x00\x00\x00aq\x00h\x00\x86.", pickleTuple{"a", "a"}},
		{"frame", "\x80\x04\x95\x03\x00\x00\x00\x00\x00\x00\x00K\x07.", int64(7)},
		{"list", "\x80\x02](K\x01K\x02e.", &pickleList{items: []any{int64(1), int64(2)}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := unpickle([]byte(tc.data))
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestUnpickleRejects(t *testing.T) {
	cases := []struct {
		name    string
		data    string
		message string
	}{
		{"no stop", "\x80\x02K\x01", "without a STOP"},
		{"unknown callable", "\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.", "os.system"},
		{"new object", "\x80\x02ctorch.nn\nLinear\n)\x81.", "torch.nn.Linear"},
		{"memo miss", "\x80\x02h\x05.", "memo entry 5"},
		{"truncated string", "\x80\x02X\xff\x00\x00\x00ab.", "runs past the end"},
		{"unknown opcode", "\x80\x02\xff.", "unknown opcode"},
		{"stack underflow", "\x80\x02R.", "stack underflow"},
		{"two values left", "\x80\x02K\x01K\x02.", "2 values left"},
		{"storage of unknown type", "\x80\x02(X\x07\x00\x00\x00storagectorch\nComplexFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ.", "ComplexFloatStorage"},
		{"integer too large", "\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.", "does not fit"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := unpickle([]byte(tc.data))
			require.Error(t, err)
			assert.True(t, errors.Is(err, ErrPickle), "%v wraps ErrPickle", err)
			assert.Contains(t, err.Error(), tc.message)
		})
	}
}

func TestPickleStateDictReadsBack(t *testing.T) {
	keys := []string{"a.weight", "a.bias", "count", "big"}
	tensors := []pickledTensor{
		{storage: 0, dtype: Float32, storageNumel: 24, offset: 0, size: []int64{2, 3, 2, 2}, stride: []int64{12, 1, 6, 3}},
		{storage: 1, dtype: Float16, storageNumel: 300, offset: 260, size: []int64{40}, stride: []int64{1}},
		{storage: 2, dtype: Int64, storageNumel: 1, offset: 0, size: []int64{}, stride: []int64{}},
		{storage: 0, dtype: Float32, storageNumel: 24, offset: 70000, size: []int64{1 << 33}, stride: []int64{-3}},
	}
	data, err := pickleStateDict(keys, tensors)
	require.NoError(t, err)

	root, err := unpickle(data)
	require.NoError(t, err)
	dict, ok := root.(*pickleDict)
	require.True(t, ok)
	got := make([]string, len(dict.keys))
	for i, k := range dict.keys {
		got[i] = k.(string)
	}
	assert.Equal(t, keys, got)
	for i, key := range keys {
		ref, ok := dict.values[key].(*tensorRef)
		require.True(t, ok, key)
		want := tensors[i]
		assert.Equal(t, want.dtype, ref.storage.dtype, key)
		assert.Equal(t, want.storageNumel, ref.storage.numel, key)
		assert.Equal(t, []string{"0", "1", "2", "0"}[i], ref.storage.key, key)
		assert.Equal(t, want.offset, ref.offset, key)
		assert.Equal(t, want.size, ref.size, key)
		assert.Equal(t, want.stride, ref.stride, key)
		assert.False(t, ref.requiresGrad, key)
	}
}

func TestPickleStateDictEmpty(t *testing.T) {
	data, err := pickleStateDict(nil, nil)
	require.NoError(t, err)
	root, err := unpickle(data)
	require.NoError(t, err)
	assert.Equal(t, newPickleDict(), root)
}

func TestPickleStateDictRejectsDType(t *testing.T) {
	_, err := pickleStateDict([]string{"x"}, []pickledTensor{{dtype: DType(9)}})
	assert.ErrorIs(t, err, ErrPickle)
}
