package decompose

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// checkScanMatchesDecode checks that scanInfo accepts data exactly when
// decodeInfo does and returns the same Info, and that ParseInfo returns what
// decodeInfo returns. It returns whether decodeInfo accepts data.
func checkScanMatchesDecode(t *testing.T, data []byte) bool {
	t.Helper()
	decoded, decodeErr := decodeInfo(data, "x.json")
	scanned, ok := scanInfo(data)
	parsed, parseErr := ParseInfo(data, "x.json")

	if decodeErr != nil {
		require.False(t, ok, "scanInfo accepts %q, which decodeInfo rejects: %v", data, decodeErr)
		require.Error(t, parseErr)
		require.Equal(t, decodeErr.Error(), parseErr.Error())
		return false
	}
	require.True(t, ok, "scanInfo rejects %q, which decodeInfo accepts", data)
	require.Equal(t, decoded, scanned)
	require.NoError(t, parseErr)
	require.Equal(t, decoded, parsed)
	return true
}

// editedEntry returns a one-entry array with the first occurrence of old in
// goodEntry replaced by new.
func editedEntry(t *testing.T, old, new string) string {
	t.Helper()
	require.Contains(t, goodEntry, old)
	return "[" + strings.Replace(goodEntry, old, new, 1) + "]"
}

func TestScanInfoMatchesDecoder(t *testing.T) {
	reordered := `[{"decom_nodes": {"last": {"weight_shape": [128, 32, 1, 3]}, "first": {"weight_shape": [32, 64, 3, 1]}},` +
		` "mode": "SCFK", "ori_layer_info": {"groups": 1, "dilation": [1, 1], "stride": [1, 1], "kernel_size": [3, 3],` +
		` "out_channels": 128, "in_channels": 64, "name": "conv"}}]`
	spacious := strings.NewReplacer(`{`, "{\r\n\t ", `}`, " \n}\t", `[`, "[ ", `]`, "\r]", `: `, " :\n", `, `, "\t,\r\n").
		Replace("[" + goodEntry + "]")
	entries := func(names ...string) string {
		list := make([]string, 0, len(names))
		for _, name := range names {
			list = append(list, strings.Replace(goodEntry, `"conv"`, name, 1))
		}
		return "[" + strings.Join(list, ", ") + "]"
	}

	tests := []struct {
		name  string
		input string
		valid bool
	}{
		{"compact entry", "[" + goodEntry + "]", true},
		{"no white space", "[" + strings.ReplaceAll(goodEntry, " ", "") + "]", true},
		{"white space around every token", " \n" + spacious + "\r\n\t ", true},
		{"keys in reverse order", reordered, true},
		{"two entries", entries(`"a"`, `"b"`), true},
		{"empty array", "[]", true},
		{"empty array with white space", " \t\r\n[ \n ]\n ", true},
		{"escaped key", editedEntry(t, `"mode"`, `"mo\u0064e"`), true},
		{"escaped mode", editedEntry(t, `"SCFK"`, `"\u0053CF\u004b"`), true},
		{"short escapes in name", editedEntry(t, `"conv"`, `"\"\\\/\b\f\n\r\t"`), true},
		{"NUL escape in name", editedEntry(t, `"conv"`, `"a\u0000b"`), true},
		{"escapes next to surrogates", editedEntry(t, `"conv"`, `"\ud7ff\uE000\uffff\u00e9"`), true},
		{"surrogate pair", editedEntry(t, `"conv"`, `"\ud83d\ude00"`), true},
		{"uppercase surrogate pair", editedEntry(t, `"conv"`, `"x\uD83D\uDE00y"`), true},
		{"raw UTF-8 name", editedEntry(t, `"conv"`, "\"conv\u00e9\u2028\U0001F600\x7f\""), true},
		{"root layer name", editedEntry(t, `"conv"`, `""`), true},
		{"maximum dimension", editedEntry(t, `"in_channels": 64`, `"in_channels": 1048576`), true},

		{"empty input", "", false},
		{"only white space", " \n\t", false},
		{"byte order mark", "\ufeff[" + goodEntry + "]", false},
		{"form feed as white space", "[\f" + goodEntry + "]", false},
		{"no-break space as white space", "[\u00a0" + goodEntry + "]", false},
		{"object at top", "{}", false},
		{"null at top", "null", false},
		{"number as entry", "[1]", false},
		{"empty entry", "[{}]", false},
		{"lone bracket", "[", false},
		{"comma only", "[,]", false},
		{"trailing comma", "[" + goodEntry + ",]", false},
		{"missing comma", "[" + goodEntry + goodEntry + "]", false},
		{"data after array", "[" + goodEntry + "] x", false},
		{"second array", "[][]", false},
		{"NUL after array", "[]\x00", false},
		{"zero", editedEntry(t, `"groups": 1`, `"groups": 0`), false},
		{"negative zero", editedEntry(t, `"groups": 1`, `"groups": -0`), false},
		{"negative", editedEntry(t, `"groups": 1`, `"groups": -1`), false},
		{"plus sign", editedEntry(t, `"groups": 1`, `"groups": +1`), false},
		{"leading zero", editedEntry(t, `"groups": 1`, `"groups": 01`), false},
		{"fraction", editedEntry(t, `"groups": 1`, `"groups": 1.0`), false},
		{"exponent", editedEntry(t, `"in_channels": 64`, `"in_channels": 64e0`), false},
		{"uppercase exponent", editedEntry(t, `"in_channels": 64`, `"in_channels": 6E1`), false},
		{"huge exponent", editedEntry(t, `"in_channels": 64`, `"in_channels": 1e400`), false},
		{"above maximum", editedEntry(t, `"in_channels": 64`, `"in_channels": 1048577`), false},
		{"above int64", editedEntry(t, `"in_channels": 64`, `"in_channels": 99999999999999999999999`), false},
		{"number as string", editedEntry(t, `"groups": 1`, `"groups": "1"`), false},
		{"boolean", editedEntry(t, `"groups": 1`, `"groups": true`), false},
		{"null", editedEntry(t, `"groups": 1`, `"groups": null`), false},
		{"array for integer", editedEntry(t, `"groups": 1`, `"groups": [1]`), false},
		{"pair with one element", editedEntry(t, `"stride": [1, 1]`, `"stride": [1]`), false},
		{"pair with three elements", editedEntry(t, `"stride": [1, 1]`, `"stride": [1, 1, 1]`), false},
		{"pair with trailing comma", editedEntry(t, `"stride": [1, 1]`, `"stride": [1, 1,]`), false},
		{"pair without comma", editedEntry(t, `"stride": [1, 1]`, `"stride": [1 1]`), false},
		{"minus after a number", editedEntry(t, `"stride": [1, 1]`, `"stride": [1-1, 1]`), false},
		{"unpaired high surrogate at end", editedEntry(t, `"conv"`, `"conv\ud800"`), false},
		{"high surrogate then text", editedEntry(t, `"conv"`, `"\ud800x"`), false},
		{"high surrogate then other escape", editedEntry(t, `"conv"`, `"\ud800\u0041"`), false},
		{"two high surrogates", editedEntry(t, `"conv"`, `"\ud800\udbff"`), false},
		{"high surrogate then escaped backslash", editedEntry(t, `"conv"`, `"\ud800\\udc00"`), false},
		{"lone low surrogate", editedEntry(t, `"conv"`, `"\udc00"`), false},
		{"two low surrogates", editedEntry(t, `"conv"`, `"\udc00\udc00"`), false},
		{"low surrogate then high", editedEntry(t, `"conv"`, `"\udc00\ud800"`), false},
		{"unknown escape", editedEntry(t, `"conv"`, `"\x41"`), false},
		{"uppercase escape", editedEntry(t, `"conv"`, `"\U0041"`), false},
		{"short unicode escape", editedEntry(t, `"conv"`, `"\u041"`), false},
		{"non-hex unicode escape", editedEntry(t, `"conv"`, `"\u00g1"`), false},
		{"raw tab in string", editedEntry(t, `"conv"`, "\"co\tnv\""), false},
		{"raw newline in string", editedEntry(t, `"conv"`, "\"co\nnv\""), false},
		{"invalid UTF-8", editedEntry(t, `"conv"`, "\"co\xffnv\""), false},
		{"overlong UTF-8", editedEntry(t, `"conv"`, "\"co\xc0\x80nv\""), false},
		{"UTF-8 surrogate", editedEntry(t, `"conv"`, "\"co\xed\xa0\x80nv\""), false},
		{"name as number", editedEntry(t, `"name": "conv"`, `"name": 5`), false},
		{"name as object", editedEntry(t, `"name": "conv"`, `"name": {"a": 1}`), false},
		{"duplicate key", editedEntry(t, `"mode": "SCFK"`, `"mode": "SCFK", "mode": "SCFK"`), false},
		{"duplicate escaped key", editedEntry(t, `"mode": "SCFK"`, `"mode": "SCFK", "mo\u0064e": "SCFK"`), false},
		{"unknown key", editedEntry(t, `"groups": 1`, `"groups": 1, "padding": [1, 1]`), false},
		{"escaped unknown key", editedEntry(t, `"decom_nodes"`, `"decom\/nodes"`), false},
		{"uppercase key", editedEntry(t, `"mode"`, `"MODE"`), false},
		{"key with unpaired surrogate", editedEntry(t, `"mode"`, `"mode\ud800"`), false},
		{"missing key", editedEntry(t, `"mode": "SCFK", `, ``), false},
		{"colon missing", editedEntry(t, `"mode": "SCFK"`, `"mode" "SCFK"`), false},
		{"key not a string", editedEntry(t, `"mode": "SCFK"`, `1: "SCFK"`), false},
		{"lowercase mode", editedEntry(t, `"SCFK"`, `"scfk"`), false},
		{"mode with space", editedEntry(t, `"SCFK"`, `"SCFK "`), false},
		{"duplicate layer", entries(`"a"`, `"a"`), false},
		{"duplicate escaped layer", entries(`"conv"`, `"co\u006ev"`), false},
		{"duplicate root layer", entries(`""`, `""`), false},
	}
	for _, test := range tests {
		t.Run(test.name, func(t *testing.T) {
			valid := checkScanMatchesDecode(t, []byte(test.input))
			assert.Equal(t, test.valid, valid, "whether decodeInfo accepts the input")
		})
	}
}

func TestScanInfoAMCTFiles(t *testing.T) {
	for _, path := range amctInfoFiles(t) {
		data, err := os.ReadFile(path)
		require.NoError(t, err)
		assert.True(t, checkScanMatchesDecode(t, data), path)
	}
}

// TestScanInfoOneByteEdits compares the parsers on every prefix
// of a valid input and on every edit of one byte: deleted, or replaced by a
// byte that often starts or ends a token.
func TestScanInfoOneByteEdits(t *testing.T) {
	input := "[" + goodEntry + "]"
	replacements := []byte(" \t\n\f\x00\x80\"\\/{}[],:-+.0159eEtnu")

	for end := range len(input) {
		assert.False(t, checkScanMatchesDecode(t, []byte(input[:end])), "prefix %q", input[:end])
	}
	for i := range len(input) {
		checkScanMatchesDecode(t, []byte(input[:i]+input[i+1:]))
		for _, c := range replacements {
			checkScanMatchesDecode(t, []byte(input[:i]+string(c)+input[i+1:]))
		}
	}
}

// FuzzScanInfo checks that scanInfo accepts exactly the inputs that
// decodeInfo, built on encoding/json, accepts and returns the same Info.
// Its seed corpus in testdata/fuzz/FuzzScanInfo is a copy of FuzzParseInfo's.
func FuzzScanInfo(f *testing.F) {
	addAMCTSeeds(f)
	f.Add([]byte("[" + goodEntry + "]"))
	f.Add([]byte("[" + strings.Replace(goodEntry, `"conv"`, `"\ud83d\ude00\u0000\/"`, 1) + "]"))
	f.Add([]byte("[" + strings.Replace(goodEntry, `"mode"`, `"mo\u0064e"`, 1) + "]"))
	f.Add([]byte("[" + strings.Replace(goodEntry, `64`, `1048576`, 1) + "]"))

	f.Fuzz(func(t *testing.T, data []byte) {
		checkScanMatchesDecode(t, data)
	})
}
