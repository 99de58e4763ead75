package decompose_test

import (
	"fmt"
	"log"
	"path/filepath"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// ExampleNetwork restructures the scripted Mixed model of AMCT's acceptance
// data as AMCT's information file lists, then prints each replaced layer and
// the changes as JSON. Seeding first makes the new weights equal to those
// AMCT draws after torch.manual_seed(1234).
func ExampleNetwork() {
	// The fixture is made by `make fixtures` (scripts/fixtures.py).
	model, err := torch.Load(filepath.Join(testutil.FixtureDir(), "mixed.pt"))
	if err != nil {
		log.Fatal(err)
	}
	defer model.Close()

	torch.ManualSeed(1234)
	result, changes, err := decompose.Network(model, testutil.AMCT("mixed", "decompose_info.json"))
	if err != nil {
		log.Fatal(err)
	}
	defer result.Close()

	for _, change := range changes {
		fmt.Printf("%s -> %s, %s\n", change.Layer, change.NewLayers[0], change.NewLayers[1])
	}
	text, err := changes.MarshalJSON()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(text))
	// Output:
	// down -> down.0, down.1
	// tall -> tall.0, tall.1
	// squeeze -> squeeze.0, squeeze.1
	// blocks.0 -> blocks.0.0, blocks.0.1
	// blocks.1 -> blocks.1.0, blocks.1.1
	// tail.0.1 -> tail.0.1.0, tail.0.1.1
	// {"down": ["down.0", "down.1"], "tall": ["tall.0", "tall.1"], "squeeze": ["squeeze.0", "squeeze.1"], "blocks.0": ["blocks.0.0", "blocks.0.1"], "blocks.1": ["blocks.1.0", "blocks.1.1"], "tail.0.1": ["tail.0.1.0", "tail.0.1.1"]}
}
