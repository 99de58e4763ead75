package decompose_test

import (
	"fmt"
	"log"

	"github.com/convsplit/convsplit/decompose"
)

// ExampleReadInfo prints the entry of an information file written by AMCT for
// a model that is itself a Conv2d, hence the empty layer name.
func ExampleReadInfo() {
	info, err := decompose.ReadInfo("../testdata/amct/root_conv/decompose_info.json")
	if err != nil {
		log.Fatal(err)
	}
	if err := info.Check(); err != nil {
		log.Fatal(err)
	}
	for _, entry := range info.Entries {
		layer := entry.Layer
		fmt.Printf("layer %q: %d -> %d channels, kernel %v, stride %v\n",
			layer.Name, layer.InChannels, layer.OutChannels, layer.KernelSize, layer.Stride)
		fmt.Printf("mode %s, rank %d, first weight %v, last weight %v\n",
			entry.Mode, entry.Rank(), entry.FirstShape, entry.LastShape)
	}
	// Output:
	// layer "": 64 -> 128 channels, kernel [3 3], stride [1 1]
	// mode SCFK, rank 32, first weight [32 64 3 1], last weight [128 32 1 3]
}
