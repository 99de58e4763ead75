package decompose

import (
	"os"
	"strconv"
	"testing"

	"github.com/convsplit/convsplit/internal/testutil"
)

// BenchmarkParseInfo times ParseInfo on AMCT's file for resnet50 (17
// entries, 7 KB) and on a generated file of 1000 entries.
func BenchmarkParseInfo(b *testing.B) {
	resnet50, err := os.ReadFile(testutil.AMCT("resnet50", "decompose_info.json"))
	if err != nil {
		b.Fatal(err)
	}
	generated := &Info{}
	for i := range 1000 {
		generated.Entries = append(generated.Entries, validEntry("layer"+strconv.Itoa(i)+".conv", SCFK))
	}

	inputs := []struct {
		name string
		data []byte
	}{
		{"resnet50", resnet50},
		{"1000 entries", generated.Marshal()},
	}
	for _, input := range inputs {
		b.Run(input.name, func(b *testing.B) {
			b.SetBytes(int64(len(input.data)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := ParseInfo(input.data, "bench.json"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkReadInfo times ReadInfo, file system calls included, on AMCT's
// file for resnet50.
func BenchmarkReadInfo(b *testing.B) {
	path := testutil.AMCT("resnet50", "decompose_info.json")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ReadInfo(path); err != nil {
			b.Fatal(err)
		}
	}
}
