package decompose

import "fmt"

// ChooseMode applies AMCT's auto_decomposition rules to a Conv2d layer. It
// returns the decomposition mode and true when the layer is decomposed, or
// false and the reason when the layer is left unchanged.
//
// A layer is left unchanged when groups > 1, a dilation is above 1, a stride
// is above 2, the smaller kernel side k is below 3, k x min(C_in, C_out) is
// below 16, or k is below 7 while min(C_in, C_out) is below 64. Otherwise the
// channel axis to split is the input one (SC modes) when C_out >= C_in, and
// the kernel axis to split is the height one (FK modes) when kh <= kw.
func ChooseMode(inChannels, outChannels int, kernel, stride, dilation [2]int, groups int) (Mode, bool, string) {
	if inChannels <= 0 || outChannels <= 0 {
		return "", false, fmt.Sprintf("invalid channel counts: in %d, out %d", inChannels, outChannels)
	}
	if kernel[0] <= 0 || kernel[1] <= 0 {
		return "", false, fmt.Sprintf("invalid kernel size %v", kernel)
	}
	if groups > 1 {
		return "", false, fmt.Sprintf("groups is %d (only 1 is decomposed)", groups)
	}
	if dilation[0] > 1 || dilation[1] > 1 {
		return "", false, fmt.Sprintf("dilation %v is above 1", dilation)
	}
	if stride[0] > 2 || stride[1] > 2 {
		return "", false, fmt.Sprintf("stride %v is above 2", stride)
	}

	kernelMin := min(kernel[0], kernel[1])
	channelMin := min(inChannels, outChannels)
	if kernelMin < 3 {
		return "", false, fmt.Sprintf("smaller kernel side %d is below 3", kernelMin)
	}
	if kernelMin*channelMin < 16 {
		return "", false, fmt.Sprintf("smaller kernel side x smaller channel count is %d x %d, below 16", kernelMin, channelMin)
	}
	if kernelMin < 7 && channelMin < 64 {
		return "", false, fmt.Sprintf("smaller channel count %d is below 64 while the smaller kernel side %d is below 7", channelMin, kernelMin)
	}

	splitInput := outChannels >= inChannels
	splitHeight := kernel[0] <= kernel[1]
	switch {
	case splitInput && splitHeight:
		return SCFK, true, ""
	case splitInput:
		return SCSK, true, ""
	case splitHeight:
		return FCFK, true, ""
	default:
		return FCSK, true, ""
	}
}
